"""Firecracker backend: spawn ``firecracker`` detached, configure it over its API socket.

Boot: unlink a stale API socket (Firecracker refuses to bind an existing path and
never removes its socket), spawn detached with stdin from a FIFO in the VM's run
dir (the serial console's input: banger's control lines go there) and stdout a pipe
to the VM's console pump (banger/guest/console.py: a size-capped, rotated
``serial.log``; a guest printing forever cannot fill the disk), poll for the
socket to a deadline, then configure in order: machine-config, boot-source (the
ELF vmlinux + initrd + banger's command line), drives in guest order (vda image
read-only, vdb overlay, vdc work; no drive is a root device, so Firecracker
appends no ``root=``: banger's initramfs mounts the root itself), the network
interface (guest MAC + TAP), the entropy device, InstanceStart.

Drive paths inside the VM directory are given relative to it and Firecracker runs
with the VM directory as its working directory.  A snapshot records drive paths
as given, so a clone restored in ANOTHER VM directory finds its own copies of the
overlay and work disks under the same relative names.

Snapshot: pause, ``PUT /snapshot/create`` (Full).  The VM stays paused; the
caller copies disks and resumes.  Restore: spawn the UFFD page-fault handler
(unless ``BANGER_UFFD=0``: then Firecracker maps the memory file itself, File
backend) listening BEFORE ``PUT /snapshot/load`` with ``network_overrides`` for the
clone's TAP, under a bounded timeout; a small supervisor process (pidfds) kills
the VMM when the handler dies and the handler when the VMM dies (a guest whose
handler is gone freezes forever).

``python -m banger.vmm.firecracker.driver supervise ...`` is that supervisor.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from banger.errors import ExternalError, GuestTimeout, HostError, NotFound
from banger.host import procs
from banger.vmm.base import VmSpec

API_SOCK = "fc.sock"
UFFD_SOCK = "uffd.sock"
SERIAL_IN = "serial.in"
VMM_LOG = "firecracker.log"
UFFD_LOG = "uffd.log"
UFFD_STATS = "uffd-stats.json"
STATE_FILE = "vm.state"
MEM_FILE = "vm.mem"
ACCESS_LOG = "access.log"
IFACE_ID = "eth0"

API_TIMEOUT = 10.0          # ordinary API calls
START_TIMEOUT = 10.0        # process up -> API socket answering
LOAD_TIMEOUT = 60.0         # PUT /snapshot/load (faults are served during it)


def _tail(path: Path | str, n: int = 20) -> str:
    """The last lines of a log, stripped of terminal controls (it may carry guest text)."""
    from banger.guest.console import tail

    return tail(path, n)


def _unlink(path) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _api(handles: dict, timeout: float = API_TIMEOUT):
    from banger.vmm.firecracker.api import FirecrackerApi

    return FirecrackerApi(handles["api_sock"], timeout=timeout)


def _hint_for(fault: str) -> str:
    f = fault.lower()
    if "tap" in f:
        return "the VM's TAP device is missing or busy: run `banger pool ls` / `banger gc`"
    if "kernel" in f or "elf" in f:
        return "Firecracker on x86_64 boots only the uncompressed ELF vmlinux; re-pull the kernel"
    if "snapshot" in f and "not allowed" in f:
        return "a snapshot can only be loaded into a fresh Firecracker process (banger bug: report it)"
    if "uffd" in f or "handler" in f:
        return "the page-fault handler did not accept the connection; see uffd.log in the VM directory, " \
               "or set BANGER_UFFD=0 to restore with the File backend"
    if "no such file" in f or "os error 2" in f:
        return "a file the VM needs is gone (image, kernel, disk or snapshot); re-create it"
    return "see firecracker.log in the VM directory (banger vm logs) for details"


def _with_hint(e):
    """Turn a FirecrackerApiError into one whose hint fits its fault_message."""
    from banger.vmm.firecracker.api import FirecrackerApiError

    if isinstance(e, FirecrackerApiError):
        e.hint = _hint_for(e.fault_message)
    return e


class FirecrackerDriver:
    name = "firecracker"

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------------ process
    def _binary(self) -> str:
        from banger.host.runner import which

        b = self.cfg.firecracker_bin
        found = b if os.path.sep in b and os.access(b, os.X_OK) else which(b)
        if not found:
            raise HostError(f"firecracker binary {b!r} not found",
                            "install Firecracker (see banger doctor) or set firecracker_bin in config.toml, "
                            "or use --backend qemu")
        return found

    def _prepare_run(self, spec: VmSpec) -> dict:
        run = Path(spec.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        Path(spec.vm_dir).mkdir(parents=True, exist_ok=True)
        paths = {"api_sock": str(run / API_SOCK), "serial_in": str(run / SERIAL_IN),
                 "uffd_sock": str(run / UFFD_SOCK), "vmm_log": str(Path(spec.vm_dir) / VMM_LOG)}
        if len(paths["api_sock"]) > 107 or len(paths["uffd_sock"]) > 107:
            raise HostError(f"runtime directory path too long for unix sockets: {run}",
                            "set BANGER_RUN to a shorter directory")
        # Firecracker refuses to bind an existing path and never removes its sockets: clear leftovers.
        for k in ("api_sock", "uffd_sock", "serial_in"):
            _unlink(paths[k])
        os.mkfifo(paths["serial_in"], 0o600)
        # --log-path must exist (Firecracker opens it without creating it).
        with open(paths["vmm_log"], "a"):
            pass
        return paths

    def _spawn(self, spec: VmSpec, paths: dict) -> dict:
        from banger.guest import console

        argv = [self._binary(), "--api-sock", paths["api_sock"], "--id", spec.vm_id,
                "--log-path", paths["vmm_log"], "--level", "Info"]
        cap = console.cap_bytes(self.cfg)
        # stdout: a pipe to the console pump (started first; it exits on EOF once the VMM is gone).
        rpipe, wpipe = os.pipe2(os.O_CLOEXEC)
        try:
            cpid, cstart = console.spawn_pump(vm_id=spec.vm_id, vm_dir=Path(spec.vm_dir),
                                              log_name=Path(spec.serial_log).name, cap=cap, vmm_fd=rpipe,
                                              diag_path=Path(spec.vm_dir) / console.PUMP_LOG)
        except BaseException:
            os.close(rpipe)
            os.close(wpipe)
            raise
        os.close(rpipe)
        pump = {"console_pid": cpid, "console_pid_start": cstart}
        # stdin: the FIFO, opened read-write so the VMM never sees EOF when a writer goes away.
        fifo = err = -1
        try:
            fifo = os.open(paths["serial_in"], os.O_RDWR | os.O_CLOEXEC)
            err = os.open(paths["vmm_log"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            p = subprocess.Popen(argv, stdin=fifo, stdout=wpipe, stderr=err, start_new_session=True,
                                 close_fds=True, cwd=str(spec.vm_dir))
        except OSError as e:
            console.stop_pump(pump, grace=0.5)
            raise HostError(f"cannot start firecracker: {e}", "check firecracker_bin in config.toml") from None
        except BaseException:
            console.stop_pump(pump, grace=0.5)
            raise
        finally:
            for fd in (fifo, wpipe, err):
                if fd >= 0:
                    os.close(fd)
        p.returncode = 0  # detached: never reaped through this handle
        start = procs.start_time(p.pid) or 0
        procs.announce(p.pid, start, argv)  # recorded by the launching step before anything slow
        return {"backend": self.name, "pid": p.pid, "pid_start": start, "api_sock": paths["api_sock"],
                "serial_in": paths["serial_in"], "serial_log": str(spec.serial_log), "vmm_log": paths["vmm_log"],
                "tap": spec.tap, "run_dir": str(spec.run_dir), "vm_dir": str(spec.vm_dir), "argv": argv, **pump}

    def _wait_api(self, handles: dict, timeout: float = START_TIMEOUT) -> float:
        """Poll for the API socket to a deadline; return seconds waited."""
        from banger.vmm.firecracker.api import FirecrackerApi

        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if not self.is_running(handles):
                raise ExternalError(f"firecracker exited during start-up:\n{_tail(handles['vmm_log'])}",
                                    "see firecracker.log in the VM directory; `banger doctor` checks the host")
            if os.path.exists(handles["api_sock"]):
                try:
                    with FirecrackerApi(handles["api_sock"], timeout=1.0) as api:
                        api.describe()
                    return time.monotonic() - t0
                except ExternalError:
                    pass
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"firecracker's API socket did not come up within {timeout:g}s",
                                   "the host may be overloaded; see firecracker.log in the VM directory")
            time.sleep(0.005)

    @staticmethod
    def _drive_path(spec: VmSpec, path: Path) -> str:
        p = Path(path)
        try:
            return str(p.resolve().relative_to(Path(spec.vm_dir).resolve()))
        except ValueError:
            return str(p.resolve())

    # ------------------------------------------------------------------ launch
    def launch(self, spec: VmSpec, progress=None) -> dict:
        from banger.vmm.firecracker.api import FirecrackerApiError

        paths = self._prepare_run(spec)
        handles = self._spawn(spec, paths)
        try:
            self._wait_api(handles)
            drives = [{"drive_id": d.drive_id, "path": str(d.path), "path_on_host": self._drive_path(spec, d.path),
                       "read_only": d.read_only} for d in spec.drives]
            with _api(handles) as api:
                api.machine_config.put(vcpu_count=spec.vcpu, mem_size_mib=spec.memory_mib, smt=False)
                api.boot_source.put(kernel_image_path=str(spec.vmlinux), initrd_path=str(spec.initrd),
                                    boot_args=spec.cmdline)
                for d in drives:
                    api.drive(d["drive_id"]).put(drive_id=d["drive_id"], path_on_host=d["path_on_host"],
                                                 is_root_device=False, is_read_only=d["read_only"])
                if spec.tap:
                    api.network_interface(IFACE_ID).put(iface_id=IFACE_ID, host_dev_name=spec.tap,
                                                        guest_mac=spec.mac)
                api.entropy.put()
                api.action("InstanceStart")
            handles["drives"] = drives
            handles["memory_mib"] = spec.memory_mib
            handles["vcpu"] = spec.vcpu
        except FirecrackerApiError as e:
            self.kill(handles)
            raise _with_hint(e) from None
        except BaseException:
            self.kill(handles)
            raise
        return handles

    def confirm_started(self, handles: dict) -> None:
        """``launch`` configured the VM over the API and saw InstanceStart accepted: nothing to wait for."""

    # ------------------------------------------------------------------ control
    def is_running(self, handles: dict) -> bool:
        return procs.alive(handles.get("pid"), handles.get("pid_start"))

    def describe(self, handles: dict) -> dict:
        with _api(handles) as api:
            return api.describe()

    def request_shutdown(self, handles: dict) -> None:
        """SendCtrlAltDel: with reboot=k the guest's reboot makes Firecracker exit 0."""
        if not self.is_running(handles):
            return
        with _api(handles) as api:
            api.action("SendCtrlAltDel")

    def kill(self, handles: dict) -> None:
        procs.kill(handles.get("pid"), handles.get("pid_start"), signal.SIGKILL)
        # the handler exits by itself once its VMM is gone (writing its stats); then SIGTERM, then SIGKILL
        u = (handles.get("uffd_pid"), handles.get("uffd_pid_start"))
        if not procs.kill(*u, 0, wait=1.0) and not procs.kill(*u, signal.SIGTERM, wait=1.0):
            procs.kill(*u, signal.SIGKILL)
        procs.kill(handles.get("supervisor_pid"), handles.get("supervisor_pid_start"), signal.SIGKILL)
        from banger.guest.console import stop_pump

        stop_pump(handles)  # it drains the pipe and exits on EOF by itself
        for k in ("api_sock", "uffd_sock", "serial_in"):
            _unlink(handles.get(k))

    def pause(self, handles: dict) -> None:
        with _api(handles) as api:
            api.vm.patch(state="Paused")

    def resume(self, handles: dict) -> None:
        with _api(handles) as api:
            api.vm.patch(state="Resumed")

    def send_console(self, handles: dict, line: str, timeout: float = 5.0, wait: bool = True) -> None:
        """Write one line to the guest's serial console input (the FIFO that is the VMM's stdin; a write
        into a pipe is taken at once, so ``wait`` changes nothing here)."""
        path = handles.get("serial_in")
        if not path or not os.path.exists(path) or not stat.S_ISFIFO(os.stat(path).st_mode):
            raise ExternalError("this VM has no serial console input", "restart the VM (banger vm restart)")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # ENXIO: nobody reads it, the VMM is gone
            raise ExternalError(f"cannot write to the serial console: {e.strerror}", "is the VM running?") from None
        try:
            data = line.rstrip("\n").encode() + b"\n"
            deadline = time.monotonic() + timeout
            while data:
                try:
                    n = os.write(fd, data)
                    data = data[n:]
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise GuestTimeout("the serial console input is full", "is the guest frozen?") from None
                    time.sleep(0.01)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, handles: dict, dest: Path, *, resume: bool = False, final: bool = False,
                 memory_path: Path | None = None) -> dict:
        """Pause the VM and write ``dest/vm.state`` + ``dest/vm.mem`` (Full; the memory file at ``memory_path``
        when given, e.g. on a tmpfs). The VM stays paused unless ``resume``; the caller copies the disks
        meanwhile. (``final``: the caller discards the VM after; nothing changes here.)"""
        from banger.vmm.firecracker.api import FirecrackerApiError

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        mem_mib = handles.get("memory_mib") or 0
        mem_out = Path(memory_path) if memory_path else dest / MEM_FILE
        # writing the memory file blocks the API; allow ~ 20 s per GiB plus slack
        timeout = 30.0 + 20.0 * (mem_mib / 1024)
        t0 = time.monotonic()
        try:
            with _api(handles) as api:
                st = api.describe().get("state")
                if st != "Paused":
                    api.vm.patch(state="Paused")
                api.snapshot_create.put(snapshot_path=str(dest / STATE_FILE), mem_file_path=str(mem_out),
                                        snapshot_type="Full", timeout=timeout)
                if resume:
                    api.vm.patch(state="Resumed")
        except FirecrackerApiError as e:
            for f in (dest / STATE_FILE, mem_out):
                _unlink(f)
            raise _with_hint(e) from None
        except BaseException:
            for f in (dest / STATE_FILE, mem_out):
                _unlink(f)
            raise
        mem_bytes = mem_out.stat().st_size
        return {"backend": self.name,
                "files": {"state": STATE_FILE, "memory": MEM_FILE if mem_out == dest / MEM_FILE else str(mem_out)},
                "mem_bytes": mem_bytes, "memory_mib": mem_mib, "vcpu": handles.get("vcpu"),
                "drives": handles.get("drives", []), "iface_id": IFACE_ID, "tap": handles.get("tap"),
                "create_ms": round((time.monotonic() - t0) * 1000, 1)}

    def restore(self, spec: VmSpec, snapshot_dir: Path, meta: dict, progress=None) -> dict:
        """Start a fresh Firecracker from ``snapshot_dir`` into ``spec`` (new TAP, run dir, VM dir).

        The caller has put copies of the snapshot's per-VM disks into ``spec.vm_dir`` under the names the
        snapshot recorded.  Returns handles; the VM is running when this returns."""
        from banger import uffd
        from banger.vmm.firecracker.api import FirecrackerApiError

        snapshot_dir = Path(snapshot_dir)
        files = meta.get("files", {})
        state_file = snapshot_dir / files.get("state", STATE_FILE)
        mem_file = snapshot_dir / files.get("memory", MEM_FILE)
        for f in (state_file, mem_file):
            if not f.exists():
                raise NotFound(f"snapshot file missing: {f}", "the snapshot is incomplete; delete and re-create it")
        for d in meta.get("drives", []):
            p = Path(d["path_on_host"])
            p = p if p.is_absolute() else Path(spec.vm_dir) / p
            if not p.exists():
                raise NotFound(f"disk {d['drive_id']} for the restored VM is missing: {p}",
                               "the image or disk the snapshot was taken with is gone; re-create the snapshot")
        timings = {}
        t0 = time.monotonic()
        paths = self._prepare_run(spec)
        use_uffd = uffd.enabled()
        handles: dict = {}
        try:
            handles.update(self._spawn(spec, paths))
            handles["uffd_sock"] = paths["uffd_sock"] if use_uffd else None
            if use_uffd:
                # The handler listens before PUT /snapshot/load; only this VMM may connect (SO_PEERCRED). It
                # replays the snapshot's access log when there is one and records it otherwise.
                upid, ustart = uffd.spawn_handler(
                    paths["uffd_sock"], str(mem_file), access_log=str(snapshot_dir / ACCESS_LOG),
                    stats_path=str(Path(spec.vm_dir) / UFFD_STATS), connect_timeout=30.0,
                    log_path=str(Path(spec.vm_dir) / UFFD_LOG), vmm_pid=handles["pid"])
                handles.update(uffd_pid=upid, uffd_pid_start=ustart)
                timings["uffd_ready_ms"] = round((time.monotonic() - t0) * 1000, 1)
                spid, sstart = self._spawn_supervisor(handles)
                handles.update(supervisor_pid=spid, supervisor_pid_start=sstart)
            self._wait_api(handles)
            timings["vmm_ready_ms"] = round((time.monotonic() - t0) * 1000, 1)
            backend = {"backend_type": "Uffd", "backend_path": paths["uffd_sock"]} if use_uffd else \
                {"backend_type": "File", "backend_path": str(mem_file)}
            overrides = [{"iface_id": meta.get("iface_id", IFACE_ID), "host_dev_name": spec.tap}] if spec.tap else None
            with _api(handles) as api:
                tl = time.monotonic()
                api.snapshot_load.put(snapshot_path=str(state_file), mem_backend=backend,
                                      network_overrides=overrides, resume_vm=False, timeout=LOAD_TIMEOUT)
                timings["load_ms"] = round((time.monotonic() - tl) * 1000, 1)
                tr = time.monotonic()
                api.vm.patch(state="Resumed")
                timings["resume_ms"] = round((time.monotonic() - tr) * 1000, 1)
            timings["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
        except FirecrackerApiError as e:
            self.kill(handles or {"api_sock": paths["api_sock"], "uffd_sock": paths["uffd_sock"],
                                  "serial_in": paths["serial_in"]})
            raise _with_hint(e) from None
        except BaseException:
            handles.setdefault("api_sock", paths["api_sock"])
            handles.setdefault("uffd_sock", paths["uffd_sock"])
            handles.setdefault("serial_in", paths["serial_in"])
            self.kill(handles)
            raise
        handles.update(drives=meta.get("drives", []), memory_mib=meta.get("memory_mib"), vcpu=meta.get("vcpu"),
                       mem_backend=backend["backend_type"], restored_from=str(snapshot_dir), restore_timings=timings)
        return handles

    @staticmethod
    def _spawn_supervisor(handles: dict) -> tuple[int, int]:
        # isolated like the handler: python -I, cwd /, scrubbed environment, this banger's package
        return procs.spawn_helper(SUPERVISOR_MODULE, "supervise", handles["pid"], handles["pid_start"],
                                  handles["uffd_pid"], handles["uffd_pid_start"])


# ---------------------------------------------------------------------- supervisor
SUPERVISOR_MODULE = "banger.vmm.firecracker.driver"


def supervise(vmm_pid: int, vmm_start: int, helper_pid: int, helper_start: int) -> int:
    """Wait on both processes (pidfds); when either one ends, SIGKILL the other. Exit when both are gone.

    Both are signalled only through the pidfds opened (and checked against their start times) here,
    so a pid reused after one of them exited is never hit."""
    import select

    vmm = procs.open_pidfd(vmm_pid, vmm_start)
    helper = procs.open_pidfd(helper_pid, helper_start)
    try:
        if vmm is not None and helper is not None:
            p = select.poll()
            p.register(vmm, select.POLLIN)
            p.register(helper, select.POLLIN)
            while not p.poll():  # blocks until one of them exits
                pass
        # The handler gone: the guest is frozen, kill the VMM now.  The VMM gone: the handler exits by
        # itself (writing its stats and access log); give it a moment, then SIGTERM, then SIGKILL.
        if vmm is not None:
            procs.kill_pidfd(vmm, signal.SIGKILL)
        if helper is not None and not procs.kill_pidfd(helper, 0, wait=2.0) and \
                not procs.kill_pidfd(helper, signal.SIGTERM, wait=1.0):
            procs.kill_pidfd(helper, signal.SIGKILL)
    finally:
        for fd in (vmm, helper):
            if fd is not None:
                os.close(fd)
    return 0


def _main(argv: list[str]) -> int:
    os.umask(0o077)  # banger.config.PRIVATE_UMASK
    if len(argv) == 5 and argv[0] == "supervise":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return supervise(*(int(x) for x in argv[1:]))
    sys.stderr.write("usage: python -m banger.vmm.firecracker.driver supervise VMM_PID VMM_START UFFD_PID UFFD_START\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
