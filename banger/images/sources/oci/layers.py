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

A layer is hostile input, so its headers and its size are bounded too:

* every header field is checked before use (uid/gid 0..2^32-2, a finite mtime in ext4's range,
  sizes and modes in range, link targets without NUL, names up to PATH_MAX); extended headers
  (PAX, GNU long names) are at most 1 MiB and at most 8 in a row; sparse entries are refused.
  A bad one is a ``BadLayer`` naming the entry, the field and the value;
* the whole image is held to a budget (``max_bytes``, ``max_image_size_mib`` in config.toml):
  every byte written counts, plus ``ENTRY_COST`` per entry (so a million empty files count as
  4 GiB), summed over all layers (files later removed still count); the decompressed tar stream
  is held to the same budget. A regular file whose declared size does not fit is refused before
  a byte of it is written (a gzip bomb stops at its first header), and the staging filesystem's
  free space is checked as the tree grows; beyond either, ``LimitExceeded`` or ``NoSpace``,
  never an internal ENOSPC.
"""

from __future__ import annotations

import errno
import math
import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from banger.errors import ExternalError, LimitExceeded, NoSpace

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
_MAX_LINK_HOPS = 40
_XATTR_PREFIXES = ("SCHILY.xattr.security.capability", "SCHILY.xattr.user.", "SCHILY.xattr.trusted.")

MiB = 1 << 20
DEFAULT_MAX_BYTES = 16384 * MiB   # config.py's max_image_size_mib default
ENTRY_COST = 4096                 # what an entry costs beyond its data: inode, directory slot, block rounding
FREE_RESERVE = 64 * MiB           # left free on the staging (and blob cache) filesystem
FREE_CHECK_EVERY = 64 * MiB       # re-read the free space after this many bytes
MAX_META_BYTES = 1 * MiB          # one PAX header or GNU long name/link
MAX_META_CHAIN = 8                # extended headers in a row before a member
ID_MAX = 2**32 - 2                # (uid_t)-1 means "unchanged" to chown
MTIME_MIN, MTIME_MAX = -(2**31), 2**34 - 2**31 - 1   # what ext4 stores: 1901-12-13 .. 2446-05-10
PATH_MAX = 4095
MAX_DEPTH = 256                   # directories deep (real images stay under 40; rmtree and os.walk recurse)
_META_TYPES = {tarfile.XHDTYPE: "PAX", tarfile.XGLTYPE: "global PAX", tarfile.SOLARIS_XHDTYPE: "Solaris PAX",
               tarfile.GNUTYPE_LONGNAME: "GNU long name", tarfile.GNUTYPE_LONGLINK: "GNU long link"}


class UnsafeLayer(ExternalError):
    """A layer tries to write outside the image root (or is otherwise hostile)."""

    code = "unsafe_layer"


class BadLayer(ExternalError):
    code = "bad_layer"


_MALFORMED = "the image is malformed or hostile; nothing was installed. Use another image or tag"


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def _show(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def require_free(path: Path | str, need: int, what: str) -> None:
    """NoSpace unless the filesystem holding ``path`` has ``need`` bytes free, counting only what an
    unprivileged writer may use (f_bavail): root's reserved blocks stay free for the host."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise NoSpace(f"not enough free space for {what}: the filesystem holding {path} has {human(free)} free, "
                      f"{human(need)} needed (banger keeps {human(FREE_RESERVE)} free)",
                      "free space there, or move BANGER_HOME to a bigger filesystem",
                      details={"free_bytes": free, "needed_bytes": need})


class _BadHeader(Exception):
    """Raised from inside tarfile's header parsing; apply_layer turns it into BadLayer (with the layer)."""


def _enc_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses, before tarfile acts on them, headers that would make it allocate or
    recurse without bound: huge or chained extended headers, and sparse maps."""

    def _proc_member(self, tf):
        kind = _META_TYPES.get(self.type)
        if kind is not None:
            if not 0 <= self.size <= MAX_META_BYTES:
                raise _BadHeader(f"a {kind} header at offset {self.offset} has size {self.size}; "
                                 f"allowed: 0 to {MAX_META_BYTES} bytes")
            depth = getattr(tf, "_banger_meta_depth", 0)
            if depth >= MAX_META_CHAIN:
                raise _BadHeader(f"more than {MAX_META_CHAIN} extended headers in a row at offset {self.offset}")
            tf._banger_meta_depth = depth + 1
            try:
                return super()._proc_member(tf)
            finally:
                tf._banger_meta_depth = depth
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _BadHeader(f"entry {_show(self.name)} is a GNU sparse file; allowed: plain files only")
        if self.size < 0:
            raise _BadHeader(f"entry {_show(self.name)} has size {self.size}; allowed: 0 or more")
        return super()._proc_member(tf)

    def _proc_gnusparse_00(self, next, *a):
        raise _BadHeader(f"entry {_show(next.name)} is a PAX sparse file; allowed: plain files only")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def check_member(m: tarfile.TarInfo, layer: str = "?") -> None:
    """Every header field banger uses is in range, or BadLayer naming the entry, field and value."""
    def bad(field: str, value, allowed: str) -> BadLayer:
        return BadLayer(f"layer {layer}: entry {_show(m.name)} has {field} {_show(value)}; allowed: {allowed}",
                        _MALFORMED)

    for attr in ("uid", "gid"):
        v = getattr(m, attr)
        if not (isinstance(v, int) and 0 <= v <= ID_MAX):
            raise bad(attr, v, f"0 to {ID_MAX}")
    t = m.mtime
    if not (isinstance(t, (int, float)) and math.isfinite(t) and MTIME_MIN <= t <= MTIME_MAX):
        raise bad("mtime", t, f"a time from {MTIME_MIN} to {MTIME_MAX} (1901-12-13 to 2446-05-10)")
    if not (isinstance(m.size, int) and m.size >= 0):
        raise bad("size", m.size, "0 or more bytes")
    if not (isinstance(m.mode, int) and 0 <= m.mode <= 0o7777777):
        raise bad("mode", m.mode, "0 to 0o7777777")
    if _enc_len(m.name) > PATH_MAX:
        raise bad("a name of length", _enc_len(m.name), f"up to {PATH_MAX} bytes")
    if m.sparse is not None:
        raise bad("a sparse map", len(m.sparse), "plain files only")
    if m.issym() or m.islnk():
        if not m.linkname or "\x00" in m.linkname:
            raise bad("link target", m.linkname, "a non-empty path without NUL bytes")
        if _enc_len(m.linkname) > PATH_MAX:
            raise bad("a link target of length", _enc_len(m.linkname), f"up to {PATH_MAX} bytes")


class _Metered:
    """The decompressed tar stream of a layer, counted against the applier's budget."""

    def __init__(self, f, applier: LayerApplier, layer: str):
        self._f, self._a, self._layer = f, applier, layer

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else 1 << 20)
        self._a._streamed(len(data), self._layer)
        return data


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
    """Applies layers in order onto ``root``; ``max_bytes`` bounds the whole image (all layers):
    bytes written plus ``ENTRY_COST`` per entry, and the decompressed tar stream. ``used`` is the
    total charged so far."""

    def __init__(self, root: Path | str, *, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = ApplyStats()
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")
        self.used = 0
        self.streamed = 0
        self._unchecked = 0  # bytes charged since the free space was last read

    # ---------- the budget ----------
    def _over(self, layer: str, what: str) -> LimitExceeded:
        mib = self.max_bytes // MiB
        return LimitExceeded(
            f"layer {layer}: {what}: the image would unpack to more than {human(self.max_bytes)} "
            f"(max_image_size_mib = {mib}); stopped",
            f"if you trust this image, raise max_image_size_mib in config.toml (now {mib}); otherwise "
            "use a smaller image", details={"limit_bytes": self.max_bytes, "used_bytes": self.used})

    def _charge(self, n: int, layer: str, name: str) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise self._over(layer, f"entry {_show(name)} brings it to {human(self.used)}")
        self._unchecked += n
        if self._unchecked >= FREE_CHECK_EVERY:
            self._unchecked = 0
            require_free(self.root, FREE_RESERVE, f"layer {layer}")

    def _reserve(self, size: int, layer: str, name: str) -> None:
        """Before a regular file of ``size`` bytes is written: it must fit, in the budget and on disk."""
        if self.used + size > self.max_bytes:
            raise self._over(layer, f"entry {_show(name)} is {human(size)}, after {human(self.used)} so far")
        if size >= FREE_CHECK_EVERY // 8 or self._unchecked + size >= FREE_CHECK_EVERY:
            require_free(self.root, size + FREE_RESERVE, f"entry {_show(name)} ({human(size)}) of layer {layer}")
            self._unchecked = 0

    def _streamed(self, n: int, layer: str) -> None:
        self.streamed += n
        if self.streamed > self.max_bytes:
            raise self._over(layer, f"its tar stream decompresses to more than {human(self.max_bytes)}")

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
            if len(done) >= MAX_DEPTH - 1:
                raise _refuse(layer, name, f"is nested more than {MAX_DEPTH} directories deep")
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
        written = _Written()  # real paths this layer created (whiteouts spare them)
        for m in tf:
            self.stats.entries += 1
            self._charge(ENTRY_COST, layer, m.name)
            check_member(m, layer)
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
                self._reserve(m.size, layer, m.name)
                self._remove(path)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    src = tf.extractfile(m)
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        self._charge(len(chunk), layer, m.name)  # as written, whatever the header said
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
                    except (OSError, ValueError):  # ValueError: a NUL in the name
                        pass
        try:
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        except OSError:
            pass

    def _whiteout(self, parts: tuple[str, ...], layer: str, name: str, written: _Written) -> None:
        try:
            parent = self._resolve_dir(parts[:-1], layer, name, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to hide
        pdir = self._abs(parent)
        if parts[-1] == OPAQUE:
            self.stats.opaque += 1
            if parent in written.opaqued:
                return  # already opaque in this layer: what is left there, this layer wrote
            written.opaqued.add(parent)
            for child in os.listdir(pdir):
                if parent + (child,) in written or written.has_below(parent + (child,)):
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


class _Written(set):
    """Real paths one layer wrote, plus every proper prefix of them (an opaque dir keeps children
    written by the same layer, and their parents) and the dirs already made opaque: each lookup
    is O(1), so a hostile layer cannot make opaque markers quadratic."""

    def __init__(self):
        super().__init__()
        self._prefixes: set[tuple[str, ...]] = set()
        self.opaqued: set[tuple[str, ...]] = set()

    def add(self, p: tuple[str, ...]) -> None:
        super().add(p)
        for i in range(len(p) - 1, 0, -1):
            if p[:i] in self._prefixes:
                break
            self._prefixes.add(p[:i])

    def has_below(self, p: tuple[str, ...]) -> bool:
        return p in self._prefixes


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
                layer: str | None = None, max_bytes: int | None = None) -> LayerApplier:
    """Apply one layer blob onto ``root``. Raises UnsafeLayer / BadLayer / LimitExceeded / NoSpace.

    ``max_bytes`` is the budget of a new applier (default ``DEFAULT_MAX_BYTES``); with ``applier``
    given, the applier's own budget (shared by all its layers) applies.
    """
    applier = applier or LayerApplier(root, max_bytes=max_bytes)
    layer = layer or posixpath.basename(str(blob))[:19]
    stream, raw = open_layer(blob)
    try:
        try:
            with tarfile.open(fileobj=_Metered(stream, applier, layer), mode="r|", tarinfo=_CheckedTarInfo) as tf:
                applier.apply(tf, layer)
        except _BadHeader as e:
            raise BadLayer(f"layer {layer}: {e}", _MALFORMED) from None
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"layer {layer}: the filesystem holding {applier.root} filled up after "
                              f"{human(applier.used)} of the image",
                              "free space there, or move BANGER_HOME to a bigger filesystem") from None
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
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
