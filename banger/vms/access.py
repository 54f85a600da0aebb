"""Guest access over SSH: a pinned-host-key transport, `vm ssh-config`, `vm cp`, the serial log path."""

from __future__ import annotations

from pathlib import Path

from banger.errors import InvalidState, UsageError
from banger.vms.runtime import PAUSED, RUNNING, SERIAL, effective_state, get, ssh_files, vm_dir


def running(ctx, ref: str):
    vm = get(ctx, ref)
    st = effective_state(ctx, vm)
    if st == PAUSED:
        raise InvalidState(f"VM {vm['name']} is paused: a snapshot create was killed while its guest was paused",
                           "run `banger gc` (it resumes the guest)")
    if st != RUNNING:
        raise InvalidState(f"VM {vm['name']} is {st}", f"start it: banger vm start {vm['name']}")
    return vm


def connect(ctx, ref: str):
    """An authenticated SSH transport to a running VM (host key pinned)."""
    from banger.guest import ssh

    vm = running(ctx, ref)
    return ssh.connect(vm["ip"], **ssh_files(ctx, vm))


def serial_log(ctx, ref: str) -> Path:
    return vm_dir(ctx, get(ctx, ref)) / SERIAL


def ssh_config(ctx, ref: str) -> str:
    vm = get(ctx, ref)
    f = ssh_files(ctx, vm)
    return (f"Host {vm['name']}\n"
            f"    HostName {vm['ip']}\n"
            f"    User root\n"
            f"    IdentityFile {f['key_path']}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {f['known_hosts']}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    HostKeyAlgorithms ssh-ed25519\n")


def parse_cp_arg(arg: str) -> tuple[str | None, str]:
    """`VM:path` -> (VM, path); a local path (containing '/' before any ':' or no ':') -> (None, path)."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        return head, tail or "."
    return None, arg


def copy(ctx, src: str, dst: str) -> dict:
    from banger.guest import ssh

    svm, spath = parse_cp_arg(src)
    dvm, dpath = parse_cp_arg(dst)
    if (svm is None) == (dvm is None):
        raise UsageError("exactly one of SRC and DST must be VM:path", "e.g. banger vm cp ./dir myvm:/root/")
    t = connect(ctx, svm or dvm)
    try:
        n = ssh.put(t, Path(spath), dpath) if dvm else ssh.get(t, spath, Path(dpath))
    finally:
        t.close()
    return {"files": n, "direction": "to_guest" if dvm else "from_guest"}
