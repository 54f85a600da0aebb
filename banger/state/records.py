"""Typed records for what crosses module boundaries: a VM, an image, a kernel, a snapshot, a TAP.

Each record names its fields (``FIELDS``), is built from a database row by ``from_row`` (JSON
columns decoded once, here) and is read as attributes (``vm.id``, ``img.work_seed``).  They are
plain ``__slots__`` classes, not dataclasses: `banger vm list` builds one per row on its start-up
path, and a slots class costs nothing to import and about a microsecond per row.

Records also answer ``rec["field"]`` and ``rec.get("field")`` so that views and JSON output can
treat them uniformly; the field set is fixed, so an unknown key is a KeyError, never a silent None
from a typo'd attribute.
"""

from __future__ import annotations

import json


class Record:
    __slots__ = ()
    FIELDS: tuple[str, ...] = ()
    JSON: tuple[str, ...] = ()     # columns stored as JSON text
    BOOL: tuple[str, ...] = ()     # columns stored as 0/1

    def __init__(self, **kw):
        for f in self.FIELDS:
            object.__setattr__(self, f, kw.pop(f, None))
        if kw:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(kw)}")

    @classmethod
    def from_row(cls, row: dict | None):
        if row is None:
            return None
        kw = {f: row.get(f) for f in cls.FIELDS}
        for f in cls.JSON:
            v = kw.get(f)
            kw[f] = json.loads(v) if isinstance(v, str) and v else (v if isinstance(v, dict) else {})
        for f in cls.BOOL:
            kw[f] = bool(kw.get(f))
        return cls(**kw)

    # mapping-style reads (views, JSON output, older call sites)
    def __getitem__(self, key: str):
        if key not in self.FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key not in self.FIELDS:
            raise KeyError(key)
        setattr(self, key, value)

    def get(self, key: str, default=None):
        if key not in self.FIELDS:
            return default
        v = getattr(self, key)
        return default if v is None else v

    def __contains__(self, key: str) -> bool:
        return key in self.FIELDS

    def keys(self):
        return self.FIELDS

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def __eq__(self, other):
        return type(self) is type(other) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        key = getattr(self, "id", None) or getattr(self, "name", None)
        return f"<{type(self).__name__} {key}>"


class VmRecord(Record):
    """One row of ``vms``. ``options`` holds what the VM was built from (rootfs, vmlinux, initrd,
    init, kernel_version, work_seed) and who is building it (``creator``: pid + start time)."""
    FIELDS = ("id", "name", "state", "image", "kernel", "backend", "vcpu", "memory_mib", "overlay_size_mib",
              "work_disk_size_mib", "nat", "slot", "ip", "mac", "error", "options", "created_at", "updated_at",
              "pool_key")
    JSON = ("options",)
    BOOL = ("nat",)
    __slots__ = FIELDS


class ImageRecord(Record):
    FIELDS = ("name", "kind", "source", "digest", "kernel", "rootfs", "work_seed", "key_fingerprint",
              "size_bytes", "meta", "created_at")
    JSON = ("meta",)
    __slots__ = FIELDS


class KernelRecord(Record):
    FIELDS = ("name", "version", "source", "dir", "manifest", "created_at")
    JSON = ("manifest",)
    __slots__ = FIELDS


class SnapshotRecord(Record):
    FIELDS = ("name", "vm_id", "vm_name", "backend", "dir", "meta", "created_at", "kind")
    JSON = ("meta",)
    __slots__ = FIELDS


class TemplateRecord(Record):
    """One row of ``templates``: what the template was built from (its key's parts) and its snapshot."""
    FIELDS = ("key", "snapshot", "image", "kernel", "backend", "vcpu", "memory_mib", "overlay_size_mib",
              "work_disk_size_mib", "parts", "build_ms", "created_at")
    JSON = ("parts",)
    __slots__ = FIELDS


class TapRecord(Record):
    FIELDS = ("name", "state", "vm_id", "created_at")
    __slots__ = FIELDS
