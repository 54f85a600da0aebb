#!/usr/bin/env python3
"""A strict contract double for the ``firecracker`` binary (v1.16.1), for hosts where
Firecracker cannot run.

It is an executable taking Firecracker's flags and serving Firecracker's HTTP API on
the unix socket, one request at a time (HTTP/1.1 keep-alive, any number of client
connections).  It enforces the documented contract and rejects what Firecracker
rejects with ``400 {"fault_message": ...}``: unknown/missing/mistyped fields, IDs
that are malformed or differ between path and body, PUT/PATCH without a body, GET
with one, unknown paths/methods, pre-boot-only requests after boot and the
reverse, ``/snapshot/load`` after boot-specific resources were configured,
snapshot create unless paused, files that do not exist at request time, TAPs that
do not exist (the TAP is really opened with TUNSETIFF, so a TAP already attached
elsewhere is refused too), an API socket path that already exists at start.
Process behaviour follows Firecracker too: SendCtrlAltDel makes it exit 0 shortly
after, a failed ``/snapshot/load`` answers 400 and then exits, SIGTERM is not
handled, and the API socket is never removed on exit.

What it cannot do is run a guest.  Instead it models guest memory as a
deterministic pattern per 4 KiB page (seeded per boot) so that snapshots are
checkable: ``/snapshot/create`` writes a state file and a memory file holding that
pattern; ``/snapshot/load`` with ``mem_backend.backend_type == "Uffd"`` performs the
REAL handshake against the handler listening on ``backend_path`` (anonymous
MAP_NORESERVE memory, a real userfaultfd registered in MISSING mode, connect,
JSON + the fd over SCM_RIGHTS; see tests/support/uffd_peer.py) and, once the VM
runs, touches every page through that mapping (so each one is served by the
handler) and compares every byte with the memory file and with the expected
pattern.  The File backend maps the memory file MAP_PRIVATE and checks it the
same way.  Serial input is read from stdin; a ``@banger net ...`` control line is
parsed the way the image's init does and acknowledged on stdout (the serial
console).

Everything observable is recorded as JSON lines in
``$FAKE_FIRECRACKER_RECORD/<id>-<pid>.jsonl`` (when that variable names a
directory) and as human-readable lines in ``--log-path`` (which, as with
Firecracker, must already exist).  Environment knobs (tests only):
``FAKE_FIRECRACKER_TOUCH`` = ``all`` (default) or a number of pages to touch.
``FAKE_FIRECRACKER_SERIAL_FLOOD`` = N: the guest prints N bytes of lines on its console at boot.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import mmap
import os
import random
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict

VERSION = "1.16.1"
SNAPSHOT_VERSION = "8.0.0"
APP_NAME = "Firecracker"
SNAP_MAGIC = b"FCDOUBLE-SNAPSHOT\n"
PAGE = 4096
MIB = 1 << 20
GAP_START = 3328 * MIB        # x86_64: the 32-bit MMIO gap starts at 3.25 GiB
FIRST_ADDR_PAST_32BITS = 4096 * MIB
MAX_CMDLINE = 2048
_ID = re.compile(r"^[A-Za-z0-9_]+$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


# ----------------------------------------------------------------------------- errors
class Fault(Exception):
    """A 400 answer. ``fatal``: Firecracker exits after answering (failed snapshot load)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.message = message
        self.fatal = fatal


def deser_error(msg: str) -> Fault:
    return Fault(f"An error occurred when deserializing the json body of a request: {msg}.")


# ----------------------------------------------------------------------------- schemas
# A type is one of: "string", "bool", "u8", "u32", "u64", "usize", "json",
# ("enum", [..]), ("obj", SCHEMA), ("array", TYPE).  A SCHEMA is (fields, required).
TOKEN_BUCKET = ({"size": "u64", "one_time_burst": "u64", "refill_time": "u64"}, ["size", "refill_time"])
RATE_LIMITER = ({"bandwidth": ("obj", TOKEN_BUCKET), "ops": ("obj", TOKEN_BUCKET)}, [])
MACHINE_CONFIG = ({"vcpu_count": "u8", "mem_size_mib": "usize", "smt": "bool", "track_dirty_pages": "bool",
                   "huge_pages": ("enum", ["None", "2M"]),
                   "cpu_template": ("enum", ["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"])},
                  ["vcpu_count", "mem_size_mib"])
MACHINE_CONFIG_PATCH = (MACHINE_CONFIG[0], [])
BOOT_SOURCE = ({"kernel_image_path": "string", "initrd_path": "string", "boot_args": "string"},
               ["kernel_image_path"])
DRIVE = ({"drive_id": "string", "partuuid": "string", "is_root_device": "bool",
          "cache_type": ("enum", ["Unsafe", "Writeback"]), "is_read_only": "bool", "path_on_host": "string",
          "rate_limiter": ("obj", RATE_LIMITER), "io_engine": ("enum", ["Sync", "Async"]), "socket": "string"},
         ["drive_id", "is_root_device"])
DRIVE_PATCH = ({"drive_id": "string", "path_on_host": "string", "rate_limiter": ("obj", RATE_LIMITER)},
               ["drive_id"])
NET = ({"iface_id": "string", "host_dev_name": "string", "guest_mac": "string", "mtu": "u32",
        "rx_rate_limiter": ("obj", RATE_LIMITER), "tx_rate_limiter": ("obj", RATE_LIMITER)},
       ["iface_id", "host_dev_name"])
NET_PATCH = ({"iface_id": "string", "rx_rate_limiter": ("obj", RATE_LIMITER),
              "tx_rate_limiter": ("obj", RATE_LIMITER)}, ["iface_id"])
ENTROPY = ({"rate_limiter": ("obj", RATE_LIMITER)}, [])
LOGGER = ({"log_path": "string", "level": "string", "show_level": "bool", "show_log_origin": "bool",
           "module": "string"}, [])
METRICS = ({"metrics_path": "string"}, ["metrics_path"])
SERIAL = ({"serial_out_path": "string", "rate_limiter": ("obj", TOKEN_BUCKET)}, [])
VSOCK = ({"guest_cid": "u32", "uds_path": "string", "vsock_id": "string"}, ["guest_cid", "uds_path"])
BALLOON = ({"amount_mib": "u32", "deflate_on_oom": "bool", "stats_polling_interval_s": "u32",
            "free_page_hinting": "bool", "free_page_reporting": "bool"}, ["amount_mib", "deflate_on_oom"])
BALLOON_PATCH = ({"amount_mib": "u32"}, ["amount_mib"])
MMDS_CONFIG = ({"version": ("enum", ["V1", "V2"]), "network_interfaces": ("array", "string"),
                "ipv4_address": "string", "imds_compat": "bool"}, ["network_interfaces"])
ACTION = ({"action_type": ("enum", ["FlushMetrics", "InstanceStart", "SendCtrlAltDel"])}, ["action_type"])
VM_STATE = ({"state": ("enum", ["Paused", "Resumed"])}, ["state"])
SNAP_CREATE = ({"snapshot_path": "string", "mem_file_path": "string",
                "snapshot_type": ("enum", ["Full", "Diff"])}, ["snapshot_path", "mem_file_path"])
MEM_BACKEND = ({"backend_type": ("enum", ["File", "Uffd"]), "backend_path": "string"},
               ["backend_type", "backend_path"])
NET_OVERRIDE = ({"iface_id": "string", "host_dev_name": "string"}, ["iface_id", "host_dev_name"])
SNAP_LOAD = ({"snapshot_path": "string", "mem_file_path": "string", "mem_backend": ("obj", MEM_BACKEND),
              "enable_diff_snapshots": "bool", "track_dirty_pages": "bool", "resume_vm": "bool",
              "network_overrides": ("array", ("obj", NET_OVERRIDE)),
              "vsock_override": ("obj", ({"uds_path": "string"}, ["uds_path"])), "clock_realtime": "bool"},
             ["snapshot_path"])
CPU_CONFIG = ({"kvm_capabilities": "json", "cpuid_modifiers": "json", "msr_modifiers": "json",
               "reg_modifiers": "json", "vcpu_features": "json"}, [])

_INT_MAX = {"u8": 255, "u32": 2**32 - 1, "u64": 2**64 - 1, "usize": 2**64 - 1}


def _describe(v) -> str:
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f"string {json.dumps(v)}"
    if isinstance(v, list):
        return "a sequence"
    if isinstance(v, dict):
        return "a map"
    return "null"


def check_type(value, typ, where: str):
    if typ == "json":
        return value
    if isinstance(typ, tuple):
        kind = typ[0]
        if kind == "enum":
            if not isinstance(value, str):
                raise deser_error(f"invalid type: {_describe(value)}, expected a variant for {where}")
            if value not in typ[1]:
                raise deser_error(f"unknown variant `{value}`, expected one of "
                                  + ", ".join(f"`{x}`" for x in typ[1]))
            return value
        if kind == "obj":
            return check_obj(value, typ[1], where)
        if kind == "array":
            if not isinstance(value, list):
                raise deser_error(f"invalid type: {_describe(value)}, expected a sequence for {where}")
            return [check_type(x, typ[1], where) for x in value]
    if typ == "string":
        if not isinstance(value, str):
            raise deser_error(f"invalid type: {_describe(value)}, expected a string for {where}")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise deser_error(f"invalid type: {_describe(value)}, expected a boolean for {where}")
        return value
    if typ in _INT_MAX:
        if isinstance(value, bool) or not isinstance(value, int):
            raise deser_error(f"invalid type: {_describe(value)}, expected {typ} for {where}")
        if value < 0 or value > _INT_MAX[typ]:
            raise deser_error(f"invalid value: integer `{value}`, expected {typ} for {where}")
        return value
    raise AssertionError(typ)


def check_obj(value, schema, where: str = "body") -> dict:
    fields, required = schema
    if not isinstance(value, dict):
        raise deser_error(f"invalid type: {_describe(value)}, expected a struct for {where}")
    for k in value:
        if k not in fields:
            raise deser_error(f"unknown field `{k}`, expected one of " + ", ".join(f"`{f}`" for f in fields))
    for r in required:
        if r not in value:
            raise deser_error(f"missing field `{r}`")
    out = {}
    for k, v in value.items():
        if v is None and k not in required:
            continue  # serde: Option<T> accepts null
        out[k] = check_type(v, fields[k], f"{where}.{k}")
    return out


def checked_id(value: str) -> str:
    if not value:
        raise Fault("Empty ID in request.")
    if len(value) > 64:
        raise Fault(f"Invalid ID: \"{value}\" is longer than 64 characters.")
    if not _ID.match(value):
        raise Fault(f"Invalid ID: \"{value}\": only alphanumeric characters and '_' are allowed.")
    return value


# ----------------------------------------------------------------------------- recording
class Recorder:
    def __init__(self, instance_id: str, log_file):
        self.path = None
        d = os.environ.get("FAKE_FIRECRACKER_RECORD")
        if d and os.path.isdir(d):
            self.path = os.path.join(d, f"{instance_id}-{os.getpid()}.jsonl")
        self.log_file = log_file
        self.lock = threading.Lock()

    def event(self, kind: str, **data):
        doc = {"t": round(time.time(), 6), "event": kind, **data}
        line = json.dumps(doc, sort_keys=True, default=str)
        with self.lock:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            if self.log_file is not None:
                try:
                    self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [fake-firecracker] {kind} "
                                        f"{json.dumps(data, sort_keys=True, default=str)}\n")
                    self.log_file.flush()
                except OSError:
                    pass


def serial_out(text: str) -> None:
    try:
        sys.stdout.write(text + "\r\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------- guest memory model
def page_pattern(seed: int, index: int) -> bytes:
    return struct.pack("<QQ", seed, index) * (PAGE // 16)


def pattern_chunk(seed: int, first_page: int, npages: int) -> bytes:
    return b"".join(page_pattern(seed, first_page + i) for i in range(npages))


def memory_regions(mem_size_mib: int) -> list[dict]:
    """Guest-physical layout Firecracker uses on x86_64 (one region, or two around the MMIO gap)."""
    size = mem_size_mib * MIB
    if size <= GAP_START:
        return [{"guest_addr": 0, "size": size, "offset": 0}]
    return [{"guest_addr": 0, "size": GAP_START, "offset": 0},
            {"guest_addr": FIRST_ADDR_PAST_32BITS, "size": size - GAP_START, "offset": GAP_START}]


def open_tap(name: str) -> int:
    """Attach to an existing TAP exactly like Firecracker (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)."""
    if not name or len(name) > 15:
        raise Fault(f"Open tap device failed: Invalid TUN/TAP Backend provided by {name}. "
                    f"Check our documentation on setting up the network devices.")
    if not os.path.exists(f"/sys/class/net/{name}"):
        raise Fault(f"Open tap device failed: Error while creating ifreq structure: No such device (os error 19). "
                    f"Invalid TUN/TAP Backend provided by {name}. Check our documentation on setting up the "
                    f"network devices.")
    try:
        flags = int(open(f"/sys/class/net/{name}/tun_flags").read().strip(), 16)
    except (OSError, ValueError):
        raise Fault(f"Open tap device failed: {name} is not a TUN/TAP device.") from None
    if not flags & 0x0002:
        raise Fault(f"Open tap device failed: {name} is a TUN device, not a TAP.")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    ifr = struct.pack("16sH", name.encode(), 0x0002 | 0x1000 | 0x4000) + b"\0" * 22
    try:
        fcntl.ioctl(fd, 0x400454CA, ifr)  # TUNSETIFF
    except OSError as e:
        os.close(fd)
        raise Fault(f"Open tap device failed: Error while creating ifreq structure: {e.strerror} "
                    f"(os error {e.errno}). Invalid TUN/TAP Backend provided by {name}.") from None
    return fd


def _open_checked(path: str, write: bool, what: str) -> int:
    try:
        return os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise Fault(f"{what}: {e.strerror} (os error {e.errno})") from None


# ----------------------------------------------------------------------------- the VMM model
class Vmm:
    def __init__(self, args, rec: Recorder):
        self.args = args
        self.rec = rec
        self.id = args.id
        self.state = "Not started"
        self.booted = False            # runtime controller active (after InstanceStart or snapshot load)
        self.boot_path = False         # boot-specific resources configured: snapshot load refused
        self.machine = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
                        "huge_pages": "None"}
        self.boot_source = None
        self.drives: OrderedDict[str, dict] = OrderedDict()
        self.ifaces: OrderedDict[str, dict] = OrderedDict()
        self.entropy = None
        self.vsock = None
        self.balloon = None
        self.metrics = None
        self.logger = None
        self.serial = None
        self.mmds_config = None
        self.mmds = None
        self.cpu_config = None
        self.seed = None
        self.cmdline = None
        self.restored_from = None
        self.mem_backend = None
        self.peer = None               # UffdPeer after a Uffd restore
        self.mem_map = None            # mmap after a File restore
        self.pending_serial: list[str] = []
        self.pending_cad = False
        self.exit_at = None
        self.exit_code = 0
        self.exit_reason = ""
        self.guest_thread = None
        self.net_config = None
        self.compare_mem = None        # the snapshot's memory file, mapped at load (Uffd), to compare with

    # ---- dispatch ----
    def route(self, method: str, path: str, body):
        p = path.split("?", 1)[0]
        parts = [x for x in p.split("/")]
        # "/drives/x" -> ["", "drives", "x"]
        key = (method, p)
        simple = {
            ("GET", "/"): lambda: self.get_instance(),
            ("GET", "/version"): lambda: {"firecracker_version": VERSION},
            ("GET", "/vm/config"): lambda: self.get_vm_config(),
            ("GET", "/machine-config"): lambda: dict(self.machine),
            ("PUT", "/machine-config"): lambda: self.put_machine_config(check_obj(body, MACHINE_CONFIG), False),
            ("PATCH", "/machine-config"): lambda: self.put_machine_config(check_obj(body, MACHINE_CONFIG_PATCH),
                                                                          True),
            ("PUT", "/boot-source"): lambda: self.put_boot_source(check_obj(body, BOOT_SOURCE)),
            ("PUT", "/entropy"): lambda: self.put_entropy(check_obj(body, ENTROPY)),
            ("PUT", "/logger"): lambda: self.put_logger(check_obj(body, LOGGER)),
            ("PUT", "/metrics"): lambda: self.put_metrics(check_obj(body, METRICS)),
            ("PUT", "/serial"): lambda: self.put_serial(check_obj(body, SERIAL)),
            ("PUT", "/vsock"): lambda: self.put_vsock(check_obj(body, VSOCK)),
            ("PUT", "/balloon"): lambda: self.put_balloon(check_obj(body, BALLOON)),
            ("PATCH", "/balloon"): lambda: self.patch_balloon(check_obj(body, BALLOON_PATCH)),
            ("GET", "/balloon"): lambda: self.get_balloon(),
            ("PUT", "/mmds/config"): lambda: self.put_mmds_config(check_obj(body, MMDS_CONFIG)),
            ("PUT", "/mmds"): lambda: self.put_mmds(body),
            ("PATCH", "/mmds"): lambda: self.patch_mmds(body),
            ("GET", "/mmds"): lambda: self.get_mmds(),
            ("PUT", "/cpu-config"): lambda: self.put_cpu_config(check_obj(body, CPU_CONFIG)),
            ("PUT", "/actions"): lambda: self.action(check_obj(body, ACTION)),
            ("PATCH", "/vm"): lambda: self.patch_vm(check_obj(body, VM_STATE)),
            ("PUT", "/snapshot/create"): lambda: self.snapshot_create(check_obj(body, SNAP_CREATE)),
            ("PUT", "/snapshot/load"): lambda: self.snapshot_load(self._load_params(body)),
        }
        if key in simple:
            return simple[key]()
        if len(parts) == 3 and parts[1] in ("drives", "network-interfaces"):
            rid = parts[2]
            if parts[1] == "drives" and method in ("PUT", "PATCH"):
                checked_id(rid)
                cfg = check_obj(body, DRIVE if method == "PUT" else DRIVE_PATCH)
                self._same_id(rid, cfg["drive_id"])
                return self.put_drive(cfg) if method == "PUT" else self.patch_drive(cfg)
            if parts[1] == "network-interfaces" and method in ("PUT", "PATCH"):
                checked_id(rid)
                cfg = check_obj(body, NET if method == "PUT" else NET_PATCH)
                self._same_id(rid, cfg["iface_id"])
                return self.put_net(cfg) if method == "PUT" else self.patch_net(cfg)
        raise Fault(f"Invalid request method and/or path: {method} {p}.")

    @staticmethod
    def _same_id(path_id: str, body_id: str):
        if path_id != body_id:
            raise Fault(f"The id from the path [{path_id}] does not match the id from the body [{body_id}]!")

    def _load_params(self, body) -> dict:
        cfg = check_obj(body, SNAP_LOAD)
        has_backend = "mem_backend" in cfg
        has_file = "mem_file_path" in cfg
        if has_backend == has_file:
            raise Fault("Either the mem_backend or mem_file_path field must be specified, but not both.")
        if "enable_diff_snapshots" in cfg and "track_dirty_pages" in cfg:
            raise Fault("Too many fields for dirty page tracking: use only track_dirty_pages.")
        return cfg

    def _preboot(self):
        if self.booted:
            raise Fault("The requested operation is not supported after starting the microVM.")

    def _postboot(self):
        if not self.booted:
            raise Fault("The requested operation is not supported before starting the microVM.")

    # ---- pre-boot configuration ----
    def get_instance(self):
        return {"id": self.id, "state": self.state, "vmm_version": VERSION, "app_name": APP_NAME}

    def get_vm_config(self):
        return {"machine-config": dict(self.machine),
                "boot-source": {k: v for k, v in (self.boot_source or {}).items() if k != "_fds"} or None,
                "drives": [{k: v for k, v in d.items() if not k.startswith("_")} for d in self.drives.values()],
                "network-interfaces": [{k: v for k, v in n.items() if not k.startswith("_")}
                                       for n in self.ifaces.values()],
                "entropy": self.entropy, "vsock": self.vsock, "balloon": self.balloon,
                "logger": self.logger, "metrics": self.metrics, "mmds-config": self.mmds_config}

    def put_machine_config(self, cfg: dict, partial: bool):
        self._preboot()
        self.boot_path = True
        new = dict(self.machine)
        if not partial:
            new.update({"smt": False, "track_dirty_pages": False, "huge_pages": "None"})
            new.pop("cpu_template", None)
        new.update(cfg)
        vcpu = new["vcpu_count"]
        if vcpu < 1 or vcpu > 32 or (new.get("smt") and vcpu > 1 and vcpu % 2):
            raise Fault("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT "
                        "is enabled, and it must be between 1 and 32.")
        if new["mem_size_mib"] == 0:
            raise Fault("The memory size (MiB) is invalid.")
        if new.get("huge_pages") == "2M" and new["mem_size_mib"] % 2:
            raise Fault("The memory size (MiB) must be a multiple of 2 when 2M huge pages are used.")
        self.machine = new

    def put_boot_source(self, cfg: dict):
        self._preboot()
        self.boot_path = True
        fds = [_open_checked(cfg["kernel_image_path"], False, "The kernel file cannot be opened")]
        if "initrd_path" in cfg:
            try:
                fds.append(_open_checked(cfg["initrd_path"], False,
                                         "The initrd file cannot be opened due to invalid path or invalid "
                                         "permissions"))
            except Fault:
                os.close(fds[0])
                raise
        if len(cfg.get("boot_args", "")) >= MAX_CMDLINE:
            for fd in fds:
                os.close(fd)
            raise Fault("The kernel command line is invalid: the string is too large.")
        if self.boot_source:
            for fd in self.boot_source["_fds"]:
                os.close(fd)
        self.boot_source = {**cfg, "_fds": fds}

    def put_drive(self, cfg: dict):
        self._preboot()
        self.boot_path = True
        if "socket" in cfg:
            if any(k in cfg for k in ("path_on_host", "is_read_only", "io_engine", "rate_limiter")):
                raise Fault("Drive config error: vhost-user-block drives take only socket, not path_on_host, "
                            "is_read_only, io_engine or rate_limiter.")
            raise Fault("Drive config error: Unable to connect to the vhost-user-block backend.")
        if "path_on_host" not in cfg:
            raise Fault("Drive config error: path_on_host is required for a virtio-block drive.")
        if cfg.get("partuuid") and not cfg["is_root_device"]:
            raise Fault("Drive config error: partuuid can only be set on the root device.")
        if cfg["is_root_device"]:
            other = [d for d, c in self.drives.items() if c["is_root_device"] and d != cfg["drive_id"]]
            if other:
                raise Fault("Drive config error: A root block device already exists!")
        ro = cfg.get("is_read_only", False)
        fd = _open_checked(cfg["path_on_host"], not ro, "Drive config error: Unable to create the virtio block "
                                                        "device: Virtio backend error: Error manipulating the "
                                                        "backing file")
        old = self.drives.get(cfg["drive_id"])
        if old:
            os.close(old["_fd"])
            self.drives[cfg["drive_id"]] = {**cfg, "_fd": fd}  # keeps its position
        else:
            self.drives[cfg["drive_id"]] = {**cfg, "_fd": fd}

    def patch_drive(self, cfg: dict):
        self._postboot()
        d = self.drives.get(cfg["drive_id"])
        if d is None:
            raise Fault(f"Drive config error: Device {cfg['drive_id']} not found.")
        if "path_on_host" in cfg:
            fd = _open_checked(cfg["path_on_host"], not d.get("is_read_only"), "Drive config error: Unable to "
                                                                                "patch the block device")
            os.close(d["_fd"])
            d["_fd"] = fd
            d["path_on_host"] = cfg["path_on_host"]

    def put_net(self, cfg: dict):
        self._preboot()
        self.boot_path = True
        mac = cfg.get("guest_mac")
        if mac is not None and not _MAC.match(mac):
            raise deser_error(f"invalid value: string {json.dumps(mac)}, expected a MAC address")
        if "mtu" in cfg and not 68 <= cfg["mtu"] <= 65535:
            raise Fault("Invalid MTU: must be between 68 and 65535.")
        for other_id, o in self.ifaces.items():
            if other_id == cfg["iface_id"]:
                continue
            if mac and o.get("guest_mac", "").lower() == mac.lower():
                raise Fault(f"The MAC address is already in use: {mac}.")
            if o["host_dev_name"] == cfg["host_dev_name"]:
                raise Fault(f"The host device name is already in use: {cfg['host_dev_name']}.")
        old = self.ifaces.pop(cfg["iface_id"], None)
        if old:
            os.close(old["_fd"])
        fd = open_tap(cfg["host_dev_name"])
        self.ifaces[cfg["iface_id"]] = {**cfg, "_fd": fd}

    def patch_net(self, cfg: dict):
        self._postboot()
        if cfg["iface_id"] not in self.ifaces:
            raise Fault(f"Network interface config error: Device {cfg['iface_id']} not found.")

    def put_entropy(self, cfg):
        self._preboot()
        self.boot_path = True
        self.entropy = cfg

    def put_logger(self, cfg):
        self._preboot()
        if "level" in cfg and cfg["level"].lower() not in ("error", "warning", "warn", "info", "debug",
                                                            "trace", "off"):
            raise Fault(f"Logger error: Failed to parse the log level: {cfg['level']}.")
        if "log_path" in cfg:
            fd = _open_checked(cfg["log_path"], True, "Logger error: Failed to open target file")
            os.close(fd)
        self.logger = cfg

    def put_metrics(self, cfg):
        self._preboot()
        if self.metrics is not None:
            raise Fault("Metrics error: Reinitialization of metrics not allowed.")
        fd = _open_checked(cfg["metrics_path"], True, "Metrics error: Failed to open target file")
        os.close(fd)
        self.metrics = cfg

    def put_serial(self, cfg):
        self._preboot()
        self.serial = cfg

    def put_vsock(self, cfg):
        self._preboot()
        self.boot_path = True
        if cfg["guest_cid"] < 3:
            raise Fault("Vsock config error: guest_cid must be at least 3.")
        if os.path.exists(cfg["uds_path"]):
            raise Fault(f"Vsock config error: Cannot create backend for vsock device: Error binding to the "
                        f"host-side Unix socket {cfg['uds_path']}: Address in use (os error 98)")
        self.vsock = cfg

    def put_balloon(self, cfg):
        self._preboot()
        self.boot_path = True
        if cfg["amount_mib"] > self.machine["mem_size_mib"]:
            raise Fault("Balloon config error: Amount of pages requested cannot be greater than the total "
                        "amount of memory.")
        self.balloon = cfg

    def patch_balloon(self, cfg):
        if self.balloon is None:
            raise Fault("Balloon config error: No balloon device found.")
        self.balloon["amount_mib"] = cfg["amount_mib"]

    def get_balloon(self):
        if self.balloon is None:
            raise Fault("Balloon config error: No balloon device found.")
        return self.balloon

    def put_mmds_config(self, cfg):
        self._preboot()
        self.boot_path = True
        for i in cfg["network_interfaces"]:
            if i not in self.ifaces:
                raise Fault(f"MMDS config error: The list of network interface IDs provided contains at least "
                            f"one ID that does not correspond to any existing network interface: {i}.")
        self.mmds_config = cfg

    def put_mmds(self, body):
        self.mmds = body

    def patch_mmds(self, body):
        if self.mmds is None:
            raise Fault("The MMDS data store is not initialized.")
        if isinstance(self.mmds, dict) and isinstance(body, dict):
            self.mmds.update(body)
        else:
            self.mmds = body

    def get_mmds(self):
        return self.mmds

    def put_cpu_config(self, cfg):
        self._preboot()
        self.cpu_config = cfg

    # ---- actions / state ----
    def action(self, cfg: dict):
        a = cfg["action_type"]
        if a == "InstanceStart":
            self._preboot()
            return self.instance_start()
        if a == "SendCtrlAltDel":
            self._postboot()
            if self.state == "Paused":
                self.pending_cad = True   # the i8042 event waits for the vCPUs
            else:
                self.schedule_exit(0, "guest rebooted (SendCtrlAltDel)")
            return None
        if a == "FlushMetrics":
            self._postboot()
            if self.metrics is None:
                raise Fault("Metrics error: the metrics system is not initialized.")
            return None

    def instance_start(self):
        if self.boot_source is None:
            raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
        with open(self.boot_source["kernel_image_path"], "rb") as f:
            head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise Fault("Start microvm error: Cannot load kernel due to invalid memory configuration or invalid "
                        "kernel image: Kernel Loader: failed to load ELF kernel image (x86_64 takes an "
                        "uncompressed 64-bit ELF vmlinux)")
        args = self.boot_source.get("boot_args",
                                    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux "
                                    "i8042.dumbkbd swiotlb=noforce")
        extra = []
        if not self.args.enable_pci:
            extra.append("pci=off")
        root = [d for d in self.drives.values() if d["is_root_device"]]
        if root:
            r = root[0]
            extra.append(f"root=PARTUUID={r['partuuid']}" if r.get("partuuid") else "root=/dev/vda")
            extra.append("ro" if r.get("is_read_only") else "rw")
        # device order as the guest sees it: the root device first, the rest in insertion order
        order = root + [d for d in self.drives.values() if not d["is_root_device"]]
        addr = 0xD0000000
        for _ in list(order) + list(self.ifaces.values()) + ([self.entropy] if self.entropy is not None else []):
            extra.append(f"virtio_mmio.device=4K@0x{addr:x}:{5 + (addr - 0xD0000000) // 0x1000}")
            addr += 0x1000
        cmdline = " ".join([args] + extra)
        if len(cmdline) + 1 > MAX_CMDLINE:
            raise Fault("Start microvm error: The kernel command line is too long.")
        self.cmdline = cmdline
        self.seed = random.getrandbits(63)
        self.booted = True
        self.state = "Running"
        guest_disks = {f"vd{chr(ord('a') + i)}": {"drive_id": d["drive_id"], "path_on_host": d["path_on_host"],
                                                  "read_only": bool(d.get("is_read_only"))}
                       for i, d in enumerate(order)}
        self.rec.event("boot", cmdline=cmdline, disks=guest_disks, machine=self.machine,
                       kernel=self.boot_source["kernel_image_path"], initrd=self.boot_source.get("initrd_path"),
                       ifaces=[{"iface_id": n["iface_id"], "host_dev_name": n["host_dev_name"],
                                "guest_mac": n.get("guest_mac")} for n in self.ifaces.values()],
                       entropy=self.entropy is not None, seed=self.seed)
        serial_out("[    0.000000] Linux version (fake-firecracker guest)")
        serial_out(f"[    0.000000] Command line: {cmdline}")
        flood = int(os.environ.get("FAKE_FIRECRACKER_SERIAL_FLOOD", "0"))  # a guest printing without end
        for i in range(flood // 32):
            serial_out(f"fake-guest: flood {i:012d}")  # 32 bytes with CR LF
        if flood:
            serial_out("fake-guest: flood done")
        self.deliver_serial()

    def patch_vm(self, cfg: dict):
        self._postboot()
        if cfg["state"] == "Paused":
            self.state = "Paused"
            self.rec.event("paused")
        else:
            self.state = "Running"
            self.rec.event("resumed")
            self.on_running()

    def on_running(self):
        self.deliver_serial()
        if self.pending_cad:
            self.pending_cad = False
            self.schedule_exit(0, "guest rebooted (SendCtrlAltDel)")
        if self.restored_from and self.guest_thread is None:
            self.guest_thread = threading.Thread(target=self.verify_memory, daemon=True)
            self.guest_thread.start()

    def schedule_exit(self, code: int, reason: str, delay: float = 0.05):
        if self.exit_at is None:
            self.exit_at = time.monotonic() + delay
            self.exit_code = code
            self.exit_reason = reason

    # ---- serial console ----
    def serial_input(self, line: str):
        self.rec.event("serial_in", line=line, state=self.state)
        self.pending_serial.append(line)
        self.deliver_serial()

    def deliver_serial(self):
        if self.state != "Running":
            return
        while self.pending_serial:
            line = self.pending_serial.pop(0)
            self.guest_handle_line(line)

    def guest_handle_line(self, line: str):
        """What banger-init (banger/data/guest/banger-init) does with a control line on the console:
        the same strict validation (lowercase unicast MAC, prefix 1-32, DNS-label hostname)."""
        line = line.rstrip("\r")
        if not line.startswith("@banger "):
            return
        if line.startswith("@banger set "):
            self.guest_handle_set(line)
            return
        parts = line.split()
        if parts[:2] in (["@banger", "hosts"], ["@banger", "hosts+"]):
            self.guest_hosts_line(line, parts)
            return
        try:
            if parts[:2] != ["@banger", "net"] or len(parts) != 6:
                raise ValueError("not a 6-field net line")
            ip, gw, mac, host = parts[2:6]
            addr, _, plen = ip.partition("/")
            if not plen.isdigit() or plen.startswith("0") or not 1 <= int(plen) <= 32:
                raise ValueError("bad prefix length")
            iface = ipaddress.IPv4Interface(ip)
            ipaddress.IPv4Address(addr)
            ipaddress.IPv4Address(gw)
            if not re.match(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", mac) or int(mac[:2], 16) & 1:
                raise ValueError(f"bad MAC {mac}")
            if not re.match(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", host):
                raise ValueError(f"bad hostname {host}")
        except ValueError as e:
            self.rec.event("guest_net_rejected", line=line, error=str(e))
            serial_out("banger-init: ignored an invalid control line")
            return
        self.net_config = {"ip": str(iface), "gateway": gw, "mac": mac, "hostname": host}
        self.rec.event("guest_net", **self.net_config)
        serial_out(f"banger-init: net {iface}")

    def guest_hosts_line(self, line: str, parts: list[str]):
        """banger-init's `@banger hosts[+] DOMAIN name=ip ...`: the same strict checks, then recorded."""
        label = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
        try:
            if len(parts) < 3 or not re.match(rf"^{label}(?:\.{label})*$", parts[2]) or len(parts[2]) > 200:
                raise ValueError("bad domain")
            if parts[1] == "hosts+" and len(parts) < 4:
                raise ValueError("a hosts+ line without names")
            entries = []
            for w in parts[3:]:
                name, eq, ip = w.partition("=")
                if not eq or not re.match(rf"^{label}$", name) or "=" in ip:
                    raise ValueError(f"bad entry {w}")
                if not re.match(r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|"
                                r"[1-9]?[0-9])){3}$", ip):
                    raise ValueError(f"bad address {ip}")
                entries.append([name, ip])
        except ValueError as e:
            self.rec.event("guest_hosts_rejected", line=line, error=str(e))
            serial_out("banger-init: ignored an invalid control line")
            return
        if parts[1] == "hosts":
            self.guest_hosts = {"domain": parts[2], "entries": entries}
        elif getattr(self, "guest_hosts", {}).get("domain") == parts[2]:
            self.guest_hosts["entries"] += entries
        self.rec.event("guest_hosts", mode=parts[1], **getattr(self, "guest_hosts", {"domain": None, "entries": []}))
        serial_out(f"banger-init: {parts[1].replace('+', ' more')} {parts[2]}")

    def guest_handle_set(self, line: str):
        """banger-init's ``@banger set NONCE key=value ...`` (same strict validation; nothing applied from a
        line with one bad field), answered ``banger-init: set NONCE ok rng=reseeded``."""
        import base64
        import hashlib

        parts = line.split()
        fields = {}
        try:
            if len(parts) < 3 or len(parts) > 10 or not re.match(r"^[0-9a-f]{8,32}$", parts[2]):
                raise ValueError("bad nonce")
            nonce = parts[2]
            for f in parts[3:]:
                k, sep, v = f.partition("=")
                if not sep or k in fields:
                    raise ValueError(f"bad or repeated field {k}")
                checks = {"rng": r"^[0-9a-f]{64,512}$", "clock": r"^[0-9]{1,12}\.[0-9]{1,9}$",
                          "host": r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", "mid": r"^[0-9a-f]{32}$",
                          "key": r"^[A-Za-z0-9+/=]{1,4096}$", "pub": r"^[A-Za-z0-9+/=]{1,1024}$",
                          "net": r"^[0-9./]+,[0-9.]+,[0-9a-f:]{17}$"}
                if k not in checks or not re.match(checks[k], v):
                    raise ValueError(f"bad field {k}")
                fields[k] = v
            if "net" in fields:
                ip, gw, mac = fields["net"].split(",")
                ipaddress.IPv4Interface(ip)
                ipaddress.IPv4Address(gw)
                if int(mac[:2], 16) & 1:
                    raise ValueError("multicast MAC")
        except ValueError as e:
            self.rec.event("guest_set_rejected", line=line[:200], error=str(e))
            serial_out("banger-init: ignored an invalid control line")
            return
        rec = {k: v for k, v in fields.items() if k not in ("key", "rng")}
        if "key" in fields:
            rec["key_sha256"] = hashlib.sha256(base64.b64decode(fields["key"])).hexdigest()
        if "rng" in fields:
            rec["rng_bytes"] = len(fields["rng"]) // 2
        if "net" in fields:
            ip, gw, mac = fields["net"].split(",")
            self.net_config = {"ip": ip, "gateway": gw, "mac": mac,
                               "hostname": fields.get("host", (self.net_config or {}).get("hostname"))}
        elif "host" in fields and self.net_config is not None:
            self.net_config = {**self.net_config, "hostname": fields["host"]}
        self.rec.event("guest_set", nonce=nonce, state=self.state, **rec)
        serial_out(f"banger-init: set {nonce} ok rng={'reseeded' if 'rng' in fields else 'none'}")

    # ---- snapshots ----
    def snapshot_create(self, cfg: dict):
        self._postboot()
        if self.state != "Paused":
            raise Fault("Create snapshot error: Cannot save the microVM state: the microVM is not paused. "
                        "Pause it first (PATCH /vm {\"state\": \"Paused\"}).")
        if cfg.get("snapshot_type") == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Fault("Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking "
                        "disabled.")
        t0 = time.monotonic()
        for key in ("snapshot_path", "mem_file_path"):
            parent = os.path.dirname(os.path.abspath(cfg[key]))
            if not os.path.isdir(parent):
                raise Fault(f"Create snapshot error: Cannot create the file {cfg[key]}: No such file or "
                            f"directory (os error 2)")
        regions = memory_regions(self.machine["mem_size_mib"])
        total = sum(r["size"] for r in regions)
        npages = total // PAGE
        try:
            with open(cfg["mem_file_path"], "wb") as f:
                step = 256
                for first in range(0, npages, step):
                    f.write(pattern_chunk(self.seed, first, min(step, npages - first)))
            state = {"magic": "fake-firecracker", "version": SNAPSHOT_VERSION, "vmm_version": VERSION,
                     "instance_id": self.id, "seed": self.seed, "machine": self.machine, "regions": regions,
                     "cmdline": self.cmdline,
                     "drives": [{k: v for k, v in d.items() if not k.startswith("_")} for d in self.drives.values()],
                     "ifaces": [{k: v for k, v in n.items() if not k.startswith("_")} for n in self.ifaces.values()],
                     "entropy": self.entropy, "vsock": self.vsock, "net_config": self.net_config,
                     "snapshot_type": cfg.get("snapshot_type", "Full")}
            with open(cfg["snapshot_path"], "wb") as f:
                f.write(SNAP_MAGIC + json.dumps(state).encode())
        except OSError as e:
            raise Fault(f"Create snapshot error: Cannot write the snapshot: {e.strerror} (os error {e.errno})") \
                from None
        self.rec.event("snapshot_create", snapshot_path=cfg["snapshot_path"], mem_file_path=cfg["mem_file_path"],
                       mem_bytes=total, seed=self.seed, ms=round((time.monotonic() - t0) * 1000, 2))

    def snapshot_load(self, cfg: dict):
        self._preboot()
        if self.boot_path:
            raise Fault("Load snapshot error: Loading a microVM snapshot not allowed after configuring "
                        "boot-specific resources.")
        t0 = time.monotonic()
        try:
            self._restore(cfg)
        except Fault as f:
            f.fatal = True
            f.message = f"Load snapshot error: Failed to restore from snapshot: {f.message}"
            self.rec.event("snapshot_load_failed", error=f.message)
            raise
        self.booted = True
        self.state = "Paused"
        self.rec.event("snapshot_load", snapshot_path=cfg["snapshot_path"], backend=self.mem_backend,
                       ms=round((time.monotonic() - t0) * 1000, 2), seed=self.seed,
                       ifaces=[{"iface_id": n["iface_id"], "host_dev_name": n["host_dev_name"]}
                               for n in self.ifaces.values()],
                       drives=[{"drive_id": d["drive_id"], "path_on_host": d["path_on_host"],
                                "abs_path": os.path.abspath(d["path_on_host"])} for d in self.drives.values()])
        if cfg.get("resume_vm"):
            self.state = "Running"
            self.on_running()

    def _restore(self, cfg: dict):
        try:
            with open(cfg["snapshot_path"], "rb") as f:
                raw = f.read()
        except OSError as e:
            raise Fault(f"Cannot open the snapshot file: {e.strerror} (os error {e.errno})") from None
        if not raw.startswith(SNAP_MAGIC):
            raise Fault("Snapshot file is invalid: bad magic (not a snapshot of this Firecracker)")
        try:
            state = json.loads(raw[len(SNAP_MAGIC):])
        except ValueError:
            raise Fault("Snapshot file is invalid: cannot deserialize the microVM state") from None
        if state.get("version") != SNAPSHOT_VERSION:
            raise Fault(f"Snapshot version {state.get('version')} is not supported by this Firecracker")
        overrides = {o["iface_id"]: o["host_dev_name"] for o in cfg.get("network_overrides", [])}
        known = {n["iface_id"] for n in state["ifaces"]}
        for i in overrides:
            if i not in known:
                raise Fault(f"Invalid network override: no network interface with id {i} in the snapshot")
        if "vsock_override" in cfg and not state.get("vsock"):
            raise Fault("Invalid vsock override: the snapshot has no vsock device")
        opened = []
        try:
            drives = OrderedDict()
            for d in state["drives"]:
                fd = _open_checked(d["path_on_host"], not d.get("is_read_only"),
                                   f"Block device error: cannot open {d['path_on_host']}")
                opened.append(fd)
                drives[d["drive_id"]] = {**d, "_fd": fd}
            ifaces = OrderedDict()
            for n in state["ifaces"]:
                n = dict(n)
                n["host_dev_name"] = overrides.get(n["iface_id"], n["host_dev_name"])
                fd = open_tap(n["host_dev_name"])
                opened.append(fd)
                ifaces[n["iface_id"]] = {**n, "_fd": fd}
            regions = state["regions"]
            total = sum(r["size"] for r in regions)
            backend = cfg.get("mem_backend") or {"backend_type": "File", "backend_path": cfg["mem_file_path"]}
            if backend["backend_type"] == "File":
                try:
                    with open(backend["backend_path"], "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size != total:
                            raise Fault(f"Cannot restore guest memory: the memory file is {size} bytes, the "
                                        f"snapshot's regions need {total}")
                        self.mem_map = mmap.mmap(f.fileno(), total, flags=mmap.MAP_PRIVATE,
                                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError as e:
                    raise Fault(f"Cannot restore guest memory: cannot open memory file: {e.strerror} "
                                f"(os error {e.errno})") from None
                self.mem_backend = {"type": "File", "path": backend["backend_path"]}
            else:
                self.peer = self._uffd_handshake(backend["backend_path"], regions)
                self.mem_backend = {"type": "Uffd", "path": backend["backend_path"]}
                self.regions = regions
                self.restored_from = cfg["snapshot_path"]
                self.compare_mem = self._memfile_for_uffd()  # opened now: it may be unlinked later
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self.drives, self.ifaces = drives, ifaces
        self.regions = regions
        self.seed = state["seed"]
        # Restoring device state reads guest memory (virtqueues etc.): faults arrive DURING the PUT, so a
        # handler that does not serve at once makes the load hang, as with Firecracker.
        self._load_touch()
        self.machine = dict(state["machine"])
        if "track_dirty_pages" in cfg or "enable_diff_snapshots" in cfg:
            self.machine["track_dirty_pages"] = bool(cfg.get("track_dirty_pages", cfg.get("enable_diff_snapshots")))
        self.entropy = state.get("entropy")
        self.vsock = state.get("vsock")
        self.seed = state["seed"]
        self.cmdline = state.get("cmdline")
        self.net_config = state.get("net_config")
        self.regions = regions
        self.restored_from = cfg["snapshot_path"]

    def _load_touch(self):
        total_pages = sum(r["size"] for r in self.regions) // PAGE
        picks = sorted({0, total_pages // 2, total_pages - 1})
        bad = 0
        for gpage in picks:
            ridx, off = self._locate(gpage * PAGE)
            if self.peer is not None:
                data = bytes(self.peer.read(ridx, off, PAGE))
            else:
                base = self.regions[ridx]["offset"] + off
                data = self.mem_map[base:base + PAGE]
            bad += data != page_pattern(self.seed, gpage)
        self.rec.event("load_touch", pages=picks, mismatched=bad)
        if bad:
            raise Fault("Cannot restore guest memory: the device state refers to memory that does not match")

    def _uffd_handshake(self, backend_path: str, regions: list[dict]):
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path.insert(0, here)
        try:
            from uffd_peer import UffdPeer
        finally:
            sys.path.pop(0)
        peer = UffdPeer([r["size"] for r in regions], page_size=PAGE)
        t0 = time.monotonic()
        try:
            peer.handshake(backend_path, mem_file_offsets=[r["offset"] for r in regions], timeout=10)
        except OSError as e:
            peer.close()
            raise Fault(f"Cannot restore guest memory: Failed to connect to the UFFD handler socket "
                        f"{backend_path}: {e.strerror or e} (os error {e.errno})") from None
        except Exception as e:  # noqa: BLE001 - any handshake failure is a failed restore
            peer.close()
            raise Fault(f"Cannot restore guest memory: UFFD handshake failed: {e}") from None
        self.rec.event("uffd_handshake", backend_path=backend_path, regions=[r["size"] for r in regions],
                       ms=round((time.monotonic() - t0) * 1000, 2))
        return peer

    # ---- the "guest" after a restore: touch memory and check every byte ----
    def verify_memory(self):
        spec = os.environ.get("FAKE_FIRECRACKER_TOUCH", "all")
        try:
            t0 = time.monotonic()
            pages_total = sum(r["size"] for r in self.regions) // PAGE
            order = list(range(pages_total))
            random.Random(self.seed).shuffle(order)  # not sequential: a real guest's access order is not
            if spec != "all":
                order = order[:max(1, int(spec))]
            mem_path = self.mem_backend["path"] if self.mem_backend["type"] == "File" else None
            file_mem = None
            if self.mem_backend["type"] == "Uffd":
                file_mem = self.compare_mem
            mismatch_file = mismatch_pattern = 0
            first_bad = None
            checked = 0
            for gpage in order:
                ridx, off = self._locate(gpage * PAGE)
                if self.peer is not None:
                    data = bytes(self.peer.read(ridx, off, PAGE))
                else:
                    base = self.regions[ridx]["offset"] + off
                    data = self.mem_map[base:base + PAGE]
                expected = page_pattern(self.seed, gpage)
                if data != expected:
                    mismatch_pattern += 1
                    first_bad = first_bad if first_bad is not None else gpage
                if file_mem is not None:
                    foff = self.regions[ridx]["offset"] + off
                    if data != file_mem[foff:foff + PAGE]:
                        mismatch_file += 1
                        first_bad = first_bad if first_bad is not None else gpage
                checked += len(data)
            self.rec.event("memory_verified", backend=self.mem_backend["type"], pages=len(order),
                           bytes=checked, mismatched_vs_pattern=mismatch_pattern,
                           mismatched_vs_file=mismatch_file if file_mem is not None else None,
                           first_bad_page=first_bad, memfile=mem_path,
                           ms=round((time.monotonic() - t0) * 1000, 2))
            serial_out(f"fake-guest: memory check {'ok' if not (mismatch_pattern or mismatch_file) else 'FAILED'} "
                       f"({len(order)} pages)")
        except Exception as e:  # noqa: BLE001 - recorded for the tests to see
            self.rec.event("memory_verify_error", error=f"{type(e).__name__}: {e}")

    def _memfile_for_uffd(self):
        path = os.environ.get("FAKE_FIRECRACKER_MEMFILE_HINT")
        # The handler owns the memory file; the double finds it next to the snapshot state file,
        # which is where banger keeps both (meta lists them); fall back to the hint.
        cand = []
        if path:
            cand.append(path)
        d = os.path.dirname(os.path.abspath(self.restored_from))
        for name in sorted(os.listdir(d)):
            if name.endswith(".mem") or name in ("mem", "memory", "mem_file"):
                cand.append(os.path.join(d, name))
        for c in cand:
            try:
                f = open(c, "rb")
                size = os.fstat(f.fileno()).st_size
                if size == sum(r["size"] for r in self.regions):
                    return mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            except OSError:
                continue
        return None

    def _locate(self, offset: int):
        for i, r in enumerate(self.regions):
            if offset < r["size"]:
                return i, offset
            offset -= r["size"]
        raise ValueError("offset beyond guest memory")


# ----------------------------------------------------------------------------- HTTP over the unix socket
class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.closing = False


def parse_request(buf: bytes, max_payload: int):
    """Return (request, rest) or (None, buf) when incomplete. Raises (Fault, close) on a bad request."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            return ("error", Fault("Request headers are too large."), True), b""
        return None, buf
    head = buf[:end].decode("latin-1")
    lines = head.split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        return ("error", Fault("Invalid request line."), True), b""
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        return ("error", Fault(f"Unsupported HTTP version {version}."), True), b""
    headers = {}
    for ln in lines[1:]:
        if ":" not in ln:
            return ("error", Fault("Invalid header."), True), b""
        k, v = ln.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("error", Fault("Transfer encoding chunked is not supported; send Content-Length."), True), b""
    rest = buf[end + 4:]
    clen = headers.get("content-length")
    if clen is None:
        body = None
    else:
        try:
            n = int(clen)
        except ValueError:
            return ("error", Fault("Invalid Content-Length."), True), b""
        if n > max_payload:
            return ("error", Fault(f"Request payload with size {n} is larger than the limit of {max_payload} "
                                   f"allowed by server."), True), b""
        if len(rest) < n:
            return None, buf
        body, rest = rest[:n], rest[n:]
    keep = not (headers.get("connection", "").lower() == "close" or version == "HTTP/1.0")
    return ("ok", method, target, headers, body, keep), rest


def http_response(status: int, payload=None, keep: bool = True) -> bytes:
    reason = {200: "OK", 204: "No Content", 400: "Bad Request"}.get(status, "")
    hdr = [f"HTTP/1.1 {status} {reason}", "Server: Firecracker API",
           f"Connection: {'keep-alive' if keep else 'close'}"]
    data = b""
    if payload is not None:
        data = json.dumps(payload).encode()
        hdr += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(hdr) + "\r\n\r\n").encode() + data


def handle(vmm: Vmm, method: str, target: str, body: bytes | None):
    """Return (status, payload, fatal)."""
    if method not in ("GET", "PUT", "PATCH"):
        raise Fault(f"Invalid request method and/or path: {method} {target}.")
    if method == "GET" and body:
        raise Fault("GET request cannot have a body.")
    doc = None
    if method in ("PUT", "PATCH"):
        if body is None or len(body) == 0:
            raise Fault(f"Empty {method} request.")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise deser_error(f"{e}") from None
    result = vmm.route(method, target, doc)
    if method == "GET":
        return 200, result
    return 204, None


def serve(vmm: Vmm, listener, rec: Recorder):
    sel = selectors.DefaultSelector()
    if listener is not None:
        sel.register(listener, selectors.EVENT_READ, "listen")
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    stdin_buf = b""
    if stdin_fd >= 0:
        try:
            mode = os.fstat(stdin_fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) and os.isatty(stdin_fd):
                os.set_blocking(stdin_fd, False)
                sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        except OSError:
            pass
    while True:
        timeout = 0.2
        if vmm.exit_at is not None:
            timeout = max(0.0, vmm.exit_at - time.monotonic())
            if timeout == 0:
                rec.event("exit", code=vmm.exit_code, reason=vmm.exit_reason)
                os._exit(vmm.exit_code)
        for key, _ in sel.select(timeout):
            if key.data == "listen":
                c, _ = listener.accept()
                c.setblocking(True)
                sel.register(c, selectors.EVENT_READ, Conn(c))
                continue
            if key.data == "stdin":
                try:
                    chunk = os.read(stdin_fd, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(stdin_fd)
                    continue
                stdin_buf += chunk
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    vmm.serial_input(line.decode(errors="replace").rstrip("\r"))
                continue
            conn: Conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(conn.sock)
                conn.sock.close()
                continue
            conn.buf += chunk
            while True:  # one request at a time, in arrival order
                parsed, conn.buf = parse_request(conn.buf, vmm.args.http_api_max_payload_size)
                if parsed is None:
                    break
                fatal = False
                if parsed[0] == "error":
                    _, fault, close = parsed
                    out = http_response(400, {"fault_message": fault.message}, keep=False)
                    rec.event("request", method=None, path=None, status=400, fault=fault.message)
                    keep = False
                else:
                    _, method, target, headers, body, keep = parsed
                    try:
                        status, payload = handle(vmm, method, target, body)
                        out = http_response(status, payload, keep)
                        rec.event("request", method=method, path=target, status=status,
                                  body=_safe_json(body))
                    except Fault as f:
                        out = http_response(400, {"fault_message": f.message}, keep)
                        rec.event("request", method=method, path=target, status=400, fault=f.message,
                                  body=_safe_json(body))
                        fatal = f.fatal
                if fatal:  # recorded before answering: the client may kill us as soon as it has the answer
                    rec.event("exit", code=1, reason="failed snapshot load is fatal")
                try:
                    conn.sock.sendall(out)
                except OSError:
                    keep = False
                if fatal:
                    os._exit(1)
                if not keep:
                    sel.unregister(conn.sock)
                    conn.sock.close()
                    break


def _safe_json(body):
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")


# ----------------------------------------------------------------------------- process
def parse_args(argv):
    p = argparse.ArgumentParser(prog="firecracker", add_help=True)
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--config-file")
    p.add_argument("--no-api", action="store_true")
    p.add_argument("--log-path")
    p.add_argument("--level", default="Info")
    p.add_argument("--module")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--metrics-path")
    p.add_argument("--boot-timer", action="store_true")
    p.add_argument("--seccomp-filter")
    p.add_argument("--no-seccomp", action="store_true")
    p.add_argument("--metadata")
    p.add_argument("--mmds-size-limit", type=int)
    p.add_argument("--http-api-max-payload-size", type=int, default=51200)
    p.add_argument("--enable-pci", action="store_true")
    p.add_argument("--start-time-us")
    p.add_argument("--start-time-cpu-us")
    p.add_argument("--parent-cpu-time-us")
    p.add_argument("--version", action="store_true")
    p.add_argument("--snapshot-version", action="store_true")
    p.add_argument("--describe-snapshot")

    class _Exit(Exception):
        pass

    def _error(msg):
        sys.stderr.write(f"Arguments parsing error: {msg}\n")
        sys.exit(153)

    p.error = _error
    return p.parse_args(argv)


def main(argv=None):
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Firecracker does not handle SIGTERM
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print(f"Firecracker v{VERSION}")
        return 0
    if args.snapshot_version:
        print(f"v{SNAPSHOT_VERSION}")
        return 0
    if args.describe_snapshot:
        try:
            raw = open(args.describe_snapshot, "rb").read()
            state = json.loads(raw[len(SNAP_MAGIC):]) if raw.startswith(SNAP_MAGIC) else None
        except (OSError, ValueError):
            state = None
        if not state:
            sys.stderr.write("Error: invalid snapshot file\n")
            return 1
        print(f"v{state['version']}")
        return 0
    if not _INSTANCE_ID.match(args.id):
        sys.stderr.write(f"Invalid instance ID: {args.id}\n")
        return 153
    if args.level.lower() not in ("off", "trace", "debug", "info", "warn", "warning", "error"):
        sys.stderr.write(f"Invalid value for level: {args.level}\n")
        return 153
    if args.no_api and not args.config_file:
        sys.stderr.write("Arguments parsing error: --no-api requires --config-file\n")
        return 153
    log_file = None
    if args.log_path:
        try:
            log_file = open(args.log_path, "r+")  # must exist; Firecracker does not create it
            log_file.seek(0, os.SEEK_END)
        except OSError as e:
            sys.stderr.write(f"Failed to initialize logger: Failed to open target file: {e}\n")
            return 1
    rec = Recorder(args.id, log_file)
    vmm = Vmm(args, rec)
    rec.event("start", argv=sys.argv, cwd=os.getcwd(), api_sock=None if args.no_api else args.api_sock,
              pid=os.getpid(), version=VERSION)
    if args.metrics_path:
        try:
            os.close(os.open(args.metrics_path, os.O_WRONLY))
        except OSError as e:
            sys.stderr.write(f"Failed to initialize metrics: {e}\n")
            return 1
        vmm.metrics = {"metrics_path": args.metrics_path}
    listener = None
    if not args.no_api:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(args.api_sock)  # fails with EADDRINUSE if the path exists, as in Firecracker
        except OSError as e:
            msg = f"Failed to open the API socket at: {args.api_sock}. Check that it is not already used. ({e})"
            sys.stderr.write(msg + "\n")
            rec.event("exit", code=1, reason=msg)
            return 1
        listener.listen(16)
    if args.config_file:
        try:
            boot_from_config(vmm, args.config_file)
        except (Fault, OSError, ValueError) as e:
            msg = getattr(e, "message", str(e))
            sys.stderr.write(f"Configuration for VMM from one single json failed: {msg}\n")
            rec.event("exit", code=152, reason=msg)
            return 152
    serve(vmm, listener, rec)
    return 0


def boot_from_config(vmm: Vmm, path: str):
    with open(path) as f:
        doc = json.load(f)
    allowed = {"boot-source", "drives", "machine-config", "network-interfaces", "logger", "metrics", "vsock",
               "entropy", "balloon", "mmds-config", "serial", "cpu-config"}
    for k in doc:
        if k not in allowed:
            raise deser_error(f"unknown field `{k}`")
    for k in ("boot-source", "drives"):
        if k not in doc:
            raise deser_error(f"missing field `{k}`")
    if "logger" in doc:
        vmm.put_logger(check_obj(doc["logger"], LOGGER))
    if "metrics" in doc:
        vmm.put_metrics(check_obj(doc["metrics"], METRICS))
    if "machine-config" in doc:
        vmm.put_machine_config(check_obj(doc["machine-config"], MACHINE_CONFIG), False)
    vmm.put_boot_source(check_obj(doc["boot-source"], BOOT_SOURCE))
    for d in doc["drives"]:
        cfg = check_obj(d, DRIVE)
        checked_id(cfg["drive_id"])
        vmm.put_drive(cfg)
    for n in doc.get("network-interfaces", []):
        cfg = check_obj(n, NET)
        checked_id(cfg["iface_id"])
        vmm.put_net(cfg)
    if doc.get("entropy") is not None:
        vmm.put_entropy(check_obj(doc["entropy"], ENTROPY))
    if doc.get("vsock") is not None:
        vmm.put_vsock(check_obj(doc["vsock"], VSOCK))
    vmm.instance_start()


if __name__ == "__main__":
    sys.exit(main())
