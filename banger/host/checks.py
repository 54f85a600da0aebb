"""One host check (what `banger doctor` prints): a name, a status, what was found, how to fix it.

Lives below every package that contributes checks (the VMM backends, the network layer, doctor)."""

from __future__ import annotations


class Check:
    __slots__ = ("name", "status", "detail", "hint", "package")

    def __init__(self, name: str, status: str, detail: str, hint: str | None = None, package: str | None = None):
        self.name, self.status, self.detail, self.hint, self.package = name, status, detail, hint, package

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "hint": self.hint,
                "package": self.package}


def tool(name: str, tool: str, package: str | None, required: bool = True, version_args=None) -> Check:
    """Is ``tool`` on PATH (and what version does it say it is)?"""
    from banger.host.runner import run, which

    path = which(tool)
    if not path:
        return Check(name, "fail" if required else "warn", f"{tool} not found",
                     f"apt-get install {package}" if package else None, package)
    detail = path
    if version_args:
        try:
            cp = run([path, *version_args], check=False, timeout=10)
            first = ((cp.stdout or "") + (cp.stderr or "")).strip().splitlines()
            if first:
                detail = f"{path} ({first[0].strip()[:80]})"
        except Exception:  # noqa: BLE001 - a version string is informational
            detail = f"{path} (version unknown)"
    return Check(name, "ok", detail)
