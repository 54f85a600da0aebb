"""Apply OCI image layers (tar, tar+gzip, tar+zstd) onto a staging root, safely.

The staging root is private to one process, so nothing else changes it while we
write.  Every entry is checked before it touches the disk:

* names are relative, normalised, and never contain ``..`` (refused otherwise);
* parent directories are resolved component by component with ``lstat``; a
  symlink on the way is followed *inside the root only* (absolute targets are
  taken relative to the root, as the guest will see them) and an entry whose
  path would leave the root through one is refused;
* the entry itself is never followed: an existing symlink, file or directory in
  its place is removed first and files are opened with ``O_EXCL|O_NOFOLLOW``;
* hard links must point at an existing non-directory inside the root;
* character and block devices are skipped (counted), FIFOs are created;
* whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) remove what
  lower layers put there, never what the same layer wrote;
* owners, modes (including setuid bits), mtimes and file capabilities
  (``security.capability`` / ``user.*`` xattrs from PAX headers) are kept.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from banger.errors import ExternalError

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
_MAX_LINK_HOPS = 40
_XATTR_PREFIXES = ("SCHILY.xattr.security.capability", "SCHILY.xattr.user.", "SCHILY.xattr.trusted.")


class UnsafeLayer(ExternalError):
    """A layer tries to write outside the image root (or is otherwise hostile)."""

    code = "unsafe_layer"


class BadLayer(ExternalError):
    code = "bad_layer"


@dataclass
class ApplyStats:
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque: int = 0
    skipped_devices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"entries": self.entries, "files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
                "hardlinks": self.hardlinks, "whiteouts": self.whiteouts, "opaque": self.opaque,
                "skipped_devices": len(self.skipped_devices)}


def _refuse(layer: str, name: str, why: str) -> UnsafeLayer:
    return UnsafeLayer(f"layer {layer} is unsafe: entry {name!r} {why}; refused",
                       "the image is malformed or hostile; nothing was installed. Use another image or tag")


def normalise(name: str, layer: str = "?") -> tuple[str, ...]:
    """Split a tar member name into safe components, or raise UnsafeLayer."""
    if name.startswith("/"):
        raise _refuse(layer, name, "is an absolute path")
    if "\x00" in name:
        raise _refuse(layer, name, "contains a NUL byte")
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise _refuse(layer, name, "contains '..'")
        parts.append(p)
    return tuple(parts)


class LayerApplier:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = ApplyStats()

    # ---------- path resolution (never lets the kernel follow a link for us) ----------
    def _abs(self, parts: tuple[str, ...]) -> str:
        return os.path.join(str(self.root), *parts) if parts else str(self.root)

    def _resolve_dir(self, parts: tuple[str, ...], layer: str, name: str, create: bool) -> tuple[str, ...]:
        """Resolve ``parts`` as a directory inside the root, following symlinks in scope.

        Returns real components (no symlink among them). Missing directories are created
        (mode 0755, root-owned) when ``create``; otherwise a missing one raises FileNotFoundError.
        """
        todo = list(parts)
        done: list[str] = []
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if not done:
                    raise _refuse(layer, name, "resolves outside the image root (through a symlink)")
                done.pop()
                continue
            p = self._abs(tuple(done + [comp]))
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(p, 0o755)
                os.chmod(p, 0o755)  # an implicit parent: 0755 in the guest whatever banger's umask (077)
                done.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise _refuse(layer, name, "goes through too many symlinks")
                target = os.readlink(p)
                if target.startswith("/"):
                    done = []
                todo = [c for c in target.split("/")] + todo
                continue
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    raise NotADirectoryError(p)
                # a file where a directory must go: the later layer wins
                os.unlink(p)
                os.mkdir(p, 0o755)
                os.chmod(p, 0o755)
            done.append(comp)
        return tuple(done)

    # ---------- removal ----------
    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # rmtree never follows symlinks inside the tree
        else:
            os.unlink(path)

    # ---------- one layer ----------
    def apply(self, tf: tarfile.TarFile, layer: str = "?") -> None:
        written: set[tuple[str, ...]] = set()  # real paths this layer created (whiteouts spare them)
        for m in tf:
            self.stats.entries += 1
            parts = normalise(m.name, layer)
            if not parts:
                if m.isdir():  # the root itself: take its metadata
                    self._meta(str(self.root), m, is_link=False)
                continue
            base = parts[-1]
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parts, layer, m.name, written)
                continue
            parent = self._resolve_dir(parts[:-1], layer, m.name, create=True)
            real = parent + (base,)
            path = self._abs(real)
            if m.isdir():
                try:
                    st = os.lstat(path)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(path)
                        os.mkdir(path, 0o700)
                except FileNotFoundError:
                    os.mkdir(path, 0o700)
                self.stats.dirs += 1
            elif m.isreg():
                self._remove(path)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    src = tf.extractfile(m)
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        _write_all(fd, chunk)
                finally:
                    os.close(fd)
                self.stats.files += 1
            elif m.issym():
                self._remove(path)
                os.symlink(m.linkname, path)
                self.stats.symlinks += 1
            elif m.islnk():
                tparts = normalise(m.linkname, layer)
                if not tparts:
                    raise _refuse(layer, m.name, "is a hard link to the image root")
                try:
                    tparent = self._resolve_dir(tparts[:-1], layer, m.name, create=False)
                except (FileNotFoundError, NotADirectoryError):
                    raise BadLayer(f"layer {layer}: hard link {m.name!r} -> {m.linkname!r}: target does not exist",
                                   "the image is malformed; use another image or tag") from None
                tpath = self._abs(tparent + (tparts[-1],))
                try:
                    tst = os.lstat(tpath)
                except FileNotFoundError:
                    raise BadLayer(f"layer {layer}: hard link {m.name!r} -> {m.linkname!r}: target does not exist",
                                   "the image is malformed; use another image or tag") from None
                if stat.S_ISDIR(tst.st_mode):
                    raise _refuse(layer, m.name, "is a hard link to a directory")
                if os.path.abspath(tpath) == os.path.abspath(path):
                    continue
                self._remove(path)
                os.link(tpath, path, follow_symlinks=False)
                self.stats.hardlinks += 1
                written.add(real)
                continue  # a hard link shares the target's inode and metadata
            elif m.isfifo():
                self._remove(path)
                os.mkfifo(path, 0o600)
            elif m.ischr() or m.isblk():
                self.stats.skipped_devices.append(m.name)
                continue
            else:
                raise BadLayer(f"layer {layer}: entry {m.name!r} has an unsupported type {m.type!r}",
                               "the image is malformed; use another image or tag")
            written.add(real)
            self._meta(path, m, is_link=m.issym())

    def _meta(self, path: str, m: tarfile.TarInfo, *, is_link: bool) -> None:
        os.lchown(path, m.uid, m.gid)
        if not is_link:
            os.chmod(path, stat.S_IMODE(m.mode))  # after lchown: chown clears setuid bits
            for k, v in (m.pax_headers or {}).items():
                if k.startswith(_XATTR_PREFIXES):
                    try:
                        val = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
                        os.setxattr(path, k[len("SCHILY.xattr."):], val, follow_symlinks=False)
                    except OSError:
                        pass
        try:
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        except OSError:
            pass

    def _whiteout(self, parts: tuple[str, ...], layer: str, name: str, written: set) -> None:
        try:
            parent = self._resolve_dir(parts[:-1], layer, name, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to hide
        pdir = self._abs(parent)
        if parts[-1] == OPAQUE:
            self.stats.opaque += 1
            for child in os.listdir(pdir):
                if parent + (child,) in written or _under_written(parent + (child,), written):
                    continue
                self._remove(os.path.join(pdir, child))
            return
        target = parts[-1][len(WHITEOUT_PREFIX):]
        if not target or target in (".", ".."):
            raise _refuse(layer, name, "is a malformed whiteout")
        self.stats.whiteouts += 1
        if parent + (target,) in written:
            return
        self._remove(os.path.join(pdir, target))


def _under_written(p: tuple[str, ...], written: set) -> bool:
    # an opaque dir keeps children written by this same layer (and their parents)
    n = len(p)
    return any(len(w) > n and w[:n] == p for w in written)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def open_layer(path: Path | str):
    """Open a (possibly compressed) layer blob as a streaming binary file object, by magic."""
    f = open(path, "rb")
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if head == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True), f
    return f, f


def apply_layer(root: Path | str, blob: Path | str, *, applier: LayerApplier | None = None,
                layer: str | None = None) -> LayerApplier:
    """Apply one layer blob onto ``root``. Raises UnsafeLayer / BadLayer."""
    applier = applier or LayerApplier(root)
    layer = layer or posixpath.basename(str(blob))[:19]
    stream, raw = open_layer(blob)
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                applier.apply(tf, layer)
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise BadLayer(f"layer {layer} could not be read: {e}",
                           "the blob is corrupt or not a tar archive; pull again or use another image") from e
        except Exception as e:
            if type(e).__module__.startswith("zstandard") or e.__class__.__name__ == "ZstdError":
                raise BadLayer(f"layer {layer} could not be decompressed: {e}",
                               "the blob is corrupt; pull again or use another image") from e
            raise
    finally:
        try:
            stream.close()
        finally:
            raw.close()
    return applier


# ---------- safe edits of a flattened tree (after the layers are applied) ----------
def _tree_parts(rel: str) -> tuple[str, ...]:
    return normalise(rel.lstrip("/"), "banger")


def tree_realpath(root: Path | str, rel: str, *, create_parents: bool = False) -> Path | None:
    """The host path of ``rel`` inside ``root`` with every parent symlink resolved in scope.

    The last component is not followed. None when a parent is missing (and not created).
    """
    a = LayerApplier(root)
    parts = _tree_parts(rel)
    try:
        parent = a._resolve_dir(parts[:-1], "banger", rel, create=create_parents)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Path(a._abs(parent + parts[-1:]))


def tree_write(root: Path | str, rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    """Create/replace a regular file inside the tree without ever following a link."""
    p = tree_realpath(root, rel, create_parents=True)
    LayerApplier._remove(str(p))
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return p


def tree_remove(root: Path | str, rel: str) -> bool:
    p = tree_realpath(root, rel)
    if p is None or not os.path.lexists(p):
        return False
    LayerApplier._remove(str(p))
    return True


def tree_is_file(root: Path | str, rel: str, *, executable: bool = False) -> bool:
    """True if ``rel`` (its last component followed in scope, as the guest would) is a regular file."""
    p = tree_realpath(root, rel)
    for _ in range(_MAX_LINK_HOPS):
        if p is None:
            return False
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p)
            base = os.path.relpath(str(p.parent), str(root))
            rel2 = target if target.startswith("/") else posixpath.join("" if base == "." else base, target)
            try:
                p = tree_realpath(root, posixpath.normpath("/" + rel2))
            except UnsafeLayer:
                return False
            continue
        return stat.S_ISREG(st.st_mode) and (not executable or bool(st.st_mode & 0o111))
    return False
