"""QEMU backend: `-M microvm` with virtio-mmio devices, controlled through QMP.

The argv is built by a pure function (``build_argv``) so it can be unit-tested.
QEMU is spawned detached (new session) and found again through pid + start time.
Serial console: the chardev is one end of a socketpair whose other end belongs to the VM's
console pump (banger/guest/console.py), started just before QEMU: it writes what the guest
prints to a size-capped, rotated ``serial.log`` and forwards what banger writes to its
control socket ``serial.sock`` (the ``@banger net ...`` line for banger-init) into the guest.
(QEMU's own ``logfile=`` has no size bound: a guest printing forever would fill the disk.)
QMP on a second
unix socket answers status / stop / cont / quit / migration.

Snapshots are QEMU migration streams written to a file descriptor handed over
with QMP ``getfd`` (no ``exec:`` shell URIs); restore starts QEMU with
``-incoming defer`` and feeds the same kind of fd to ``migrate-incoming``.

Guest memory.  A booted VM keeps its RAM in a memfd (``memory-backend-memfd,share=on``): shmem,
not bound by a tmpfs mount's size, gone with the process.  Its snapshot is then device state only
(``x-ignore-shared``: the shared RAM block is not streamed) plus a sparse copy of the memfd (read
through /proc/<pid>/fd while the VM is paused): ~0.1-0.3 s instead of a ~0.7 s stream of every page,
and the copy holds only the pages the guest touched.  (A VM launched with ``spec.extra["memory_file"]
= {"path", "share": True}`` does the same with that file.)  A restore of such a snapshot maps the RAM
file PRIVATELY (``memory-backend-file,share=off``): the clones of one snapshot read the same page-cache
pages and copy a page only when they write it (copy-on-write across clones), and the restore itself
loads ~100 KiB of device state.  A restored VM's RAM is that private mapping, which cannot be copied
as a file: its snapshots are full migration streams, and ``make_shareable`` turns one into the shared
form with a paused loader QEMU (which costs a page allocation per guest page: a read of every hole).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from banger.errors import ExternalError, GuestTimeout, NotFound
from banger.host import procs
from banger.vmm.base import VmSpec

QMP_SOCK = "qmp.sock"
SERIAL_SOCK = "serial.sock"
VMM_LOG = "qemu.log"
SNAPSHOT_FILE = "vmstate.bin"
MEMORY_FILE = "memory.ram"          # guest RAM of a shared-memory snapshot
FULL_STATE_FILE = "vmstate.full"    # a full stream kept only while make_shareable converts it


def _opt(value) -> str:
    """A value inside a QEMU -object/-drive option list (a comma is written twice)."""
    return str(value).replace(",", ",,")


def build_argv(spec: VmSpec, *, qemu_bin: str, accel: str, serial_fd: int, incoming: bool = False) -> list[str]:
    """The full QEMU command line for ``spec`` (no shell involved); ``serial_fd`` is QEMU's (inherited)
    end of the console socketpair."""
    run = Path(spec.run_dir)
    kernel = spec.vmlinux if spec.vmlinux and Path(spec.vmlinux).exists() else spec.bzimage
    if kernel is None:
        kernel = spec.vmlinux
    mem = (spec.extra or {}).get("memory_file")
    memfd = (spec.extra or {}).get("memfd") and not mem
    machine = "microvm,acpi=on,pit=on,pic=on,rtc=on" + (",memory-backend=microvm.ram" if mem or memfd else "")
    argv = [qemu_bin,
            "-name", f"banger-{spec.name},debug-threads=off",
            "-M", machine,
            "-accel", "kvm" if accel == "kvm" else "tcg",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(spec.vcpu),
            "-m", f"{spec.memory_mib}M",
            "-no-reboot", "-nodefaults", "-nographic", "-no-user-config",
            "-kernel", str(kernel),
            "-initrd", str(spec.initrd),
            "-append", spec.cmdline,
            "-chardev", f"socket,id=ser0,fd={int(serial_fd)}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{run / QMP_SOCK},server=on,wait=off",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0"]
    if mem:  # the id is the default RAM block's name, so streams migrate between both kinds
        argv += ["-object", f"memory-backend-file,id=microvm.ram,size={spec.memory_mib}M,mem-path={_opt(mem['path'])},"
                            f"share={'on' if mem.get('share') else 'off'}"]
    elif memfd:
        argv += ["-object", f"memory-backend-memfd,id=microvm.ram,size={spec.memory_mib}M,share=on"]
    for d in spec.drives:
        opts = f"file={d.path},if=none,id={d.drive_id},format=raw,cache=writeback,discard=unmap"
        if d.read_only:
            opts = f"file={d.path},if=none,id={d.drive_id},format=raw,readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive={d.drive_id}"]
    if spec.tap:
        argv += ["-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
    elif (spec.extra or {}).get("loader_tap"):
        # a loader (make_shareable) needs the same NIC model with a vnet_hdr backend, but no network:
        # QEMU creates this TAP itself and it vanishes with the process (never on a bridge)
        argv += ["-netdev", f"tap,id=net0,ifname={spec.extra['loader_tap']},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
    if (spec.extra or {}).get("paused"):
        argv += ["-S"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def log_tail(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a (serial / VMM) log, stripped of terminal controls (guest text), without
    reading all of a large file; includes the end of the rotated ``serial.log.1`` when needed."""
    from banger.guest.console import tail

    return tail(path, n)


class QemuDriver:
    name = "qemu"

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- launch ----
    def _accel(self) -> str:
        from banger.host.hostinfo import qemu_accel

        return qemu_accel()

    def _spawn(self, spec: VmSpec, *, incoming: bool = False) -> dict:
        """Start the console pump, then QEMU with its end of the console socketpair."""
        import socket

        from banger.guest import console
        from banger.host.runner import require

        run = Path(spec.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        for s in (QMP_SOCK, SERIAL_SOCK):
            (run / s).unlink(missing_ok=True)
        cap = console.cap_bytes(self.cfg)
        qemu_bin = require(self.cfg.qemu_bin, "qemu-system-x86")
        log = Path(spec.vm_dir) / VMM_LOG
        handles = {"backend": self.name, "qmp": str(run / QMP_SOCK), "serial_sock": str(run / SERIAL_SOCK),
                   "serial_log": str(spec.serial_log), "vmm_log": str(log), "tap": spec.tap, "run_dir": str(run)}
        vmm_end, pump_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            control.bind(handles["serial_sock"])
            os.chmod(handles["serial_sock"], 0o600)
            control.listen(8)
            cpid, cstart = console.spawn_pump(vm_id=spec.vm_id, vm_dir=Path(spec.vm_dir),
                                              log_name=Path(spec.serial_log).name, cap=cap,
                                              vmm_fd=pump_end.fileno(), control_fd=control.fileno(),
                                              diag_path=Path(spec.vm_dir) / console.PUMP_LOG)
            handles.update(console_pid=cpid, console_pid_start=cstart)
            pump_end.close()
            control.close()
            argv = build_argv(spec, qemu_bin=qemu_bin, accel=self._accel(), serial_fd=vmm_end.fileno(),
                              incoming=incoming)
            pid, start = procs.spawn_detached(argv, stdout_path=str(log), pass_fds=(vmm_end.fileno(),))
            handles.update(pid=pid, pid_start=start, argv=argv)
        except BaseException:
            for s in (vmm_end, pump_end, control):
                s.close()
            console.stop_pump(handles, grace=0.5)
            Path(handles["serial_sock"]).unlink(missing_ok=True)
            raise
        vmm_end.close()
        mem = (spec.extra or {}).get("memory_file")
        if mem and mem.get("share"):
            handles["memory_file"] = str(mem["path"])  # the guest's RAM lives in this file (snapshot())
        elif (spec.extra or {}).get("memfd") and not mem:
            handles["memfd"] = True
        return handles

    def _wait_qmp(self, handles: dict, timeout: float = 30.0):
        from banger.vmm.qemu.qmp import Qmp, QmpError

        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running(handles):
                raise ExternalError(f"QEMU exited during start-up:\n{log_tail(Path(handles['vmm_log']))}",
                                    "check the kernel/image paths and `banger doctor`")
            try:
                return Qmp(handles["qmp"]).connect(deadline=min(deadline, time.monotonic() + 0.5))
            except QmpError:
                if time.monotonic() >= deadline:
                    raise GuestTimeout(f"QEMU's QMP socket did not come up within {timeout:g}s",
                                       "the host may be overloaded; try again") from None

    def launch(self, spec: VmSpec, progress=None) -> dict:
        if not (spec.extra or {}).get("memory_file") and self.cfg.extra.get("qemu_memfd", True):
            spec.extra = {**(spec.extra or {}), "memfd": True}
        handles = self._spawn(spec)
        if not (spec.extra or {}).get("paused"):
            # QEMU runs the guest from its first instant (no -S): nothing is left to configure over QMP,
            # so launch returns as soon as the process exists. Its start-up errors (a bad path, a
            # refused option) end the process, which the SSH wait sees (banger.vms.runtime.wait_for_ssh
            # reports the VMM's own log then).
            return handles
        self.confirm_started(handles)
        return handles

    def confirm_started(self, handles: dict) -> None:
        """QEMU's monitor answers and the guest runs (its start-up errors are raised with its log)."""
        try:
            with self._wait_qmp(handles) as q:
                if q.status() != "running":
                    q.execute("cont")
        except BaseException:
            self.kill(handles)
            raise

    # ---- control ----
    def is_running(self, handles: dict) -> bool:
        return procs.alive(handles.get("pid"), handles.get("pid_start"))

    def _qmp(self, handles, command, args=None, timeout=5.0):
        from banger.vmm.qemu.qmp import qmp_call

        return qmp_call(handles["qmp"], command, args, timeout)

    def status(self, handles: dict) -> str | None:
        if not self.is_running(handles):
            return None
        try:
            return self._qmp(handles, "query-status")["status"]
        except ExternalError:
            return None

    def request_shutdown(self, handles: dict) -> None:
        """ACPI power button via QMP (the caller also asks banger-init over SSH; see services.vms.stop)."""
        try:
            self._qmp(handles, "system_powerdown")
        except ExternalError:
            pass

    def kill(self, handles: dict) -> None:
        if self.is_running(handles):
            try:
                self._qmp(handles, "quit", timeout=2.0)
            except ExternalError:
                pass
            if not procs.kill(handles.get("pid"), handles.get("pid_start"), signal.SIGTERM, wait=0.5):
                procs.kill(handles.get("pid"), handles.get("pid_start"), signal.SIGKILL, wait=5.0)
        from banger.guest.console import stop_pump

        stop_pump(handles)  # it drains what QEMU wrote last and exits on EOF by itself
        run = handles.get("run_dir")
        for key in ("qmp", "serial_sock"):
            if handles.get(key):
                Path(handles[key]).unlink(missing_ok=True)
        if run:
            try:
                os.rmdir(run)
            except OSError:
                pass

    def pause(self, handles: dict) -> None:
        self._qmp(handles, "stop")

    def resume(self, handles: dict) -> None:
        self._qmp(handles, "cont")

    def send_console(self, handles: dict, line: str, timeout: float = 5.0, wait: bool = True) -> None:
        """Write one line to the guest's serial console input (banger-init's control channel). ``wait``:
        until the console pump took it (a client's bytes stay readable after it hangs up, so without
        ``wait`` nothing is lost, only the check that the pump is draining)."""
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(handles["serial_sock"])
            s.sendall(line.rstrip("\n").encode() + b"\n")
            if not wait:
                return
            # The console pump reads it and queues it for QEMU (whose UART only takes a FIFO's worth at a
            # time); wait until the pump took every byte (SIOCOUTQ == 0) before hanging up.
            import fcntl
            import struct
            import termios

            deadline = time.monotonic() + timeout
            nap = 0.0005  # the pump usually takes a line within a millisecond: poll fast, then back off
            while time.monotonic() < deadline:
                pending = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                if pending == 0:
                    break
                time.sleep(nap)
                nap = min(nap * 2, 0.01)
            else:
                raise ExternalError("the guest did not read the console line in time",
                                    "is the guest's init listening on its console?")
        except OSError as e:
            raise ExternalError(f"cannot write to the serial console: {e}", "is the VM running?") from None
        finally:
            s.close()

    # ---- snapshots ----
    def _migrate_wait(self, q, what: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        interval = 0.001  # a device-only state (a shared-RAM VM: ~100 KiB) is written in a few ms
        while True:
            info = q.execute("query-migrate")
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise ExternalError(f"QEMU {what} failed: {info.get('error-desc', st)}",
                                    "see the VMM log in the VM directory")
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"QEMU {what} did not finish within {timeout:g}s", "try again")
            time.sleep(interval)
            interval = min(0.05, interval * 2)

    @staticmethod
    def _ignore_shared(q, on: bool = True) -> None:
        """Set x-ignore-shared explicitly: a clone restored with it on keeps it on, and a full snapshot of
        that clone must then say off (the destination refuses a stream whose capabilities differ)."""
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})

    def _migrate_out(self, q, out: Path, *, ignore_shared: bool) -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._ignore_shared(q, ignore_shared)
            q.execute("getfd", {"fdname": "bangersnap"}, fds=[fd])
            os.close(fd)
            fd = -1
            q.execute("migrate", {"uri": "fd:bangersnap"})
            self._migrate_wait(q, "snapshot", 600)
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _ram_source(handles: dict) -> str | None:
        """A path the guest's shared RAM can be read through (its file, or its memfd), else None."""
        if handles.get("memory_file"):
            return handles["memory_file"]
        if not handles.get("memfd") or not procs.alive(handles.get("pid"), handles.get("pid_start")):
            return None
        fds = f"/proc/{handles['pid']}/fd"
        try:
            for n in os.listdir(fds):
                try:
                    if os.readlink(f"{fds}/{n}").startswith("/memfd:memory-backend-memfd"):
                        return f"{fds}/{n}"
                except OSError:
                    continue
        except OSError:
            pass
        return None

    def snapshot(self, handles: dict, dest: Path, *, final: bool = False, memory_path: Path | None = None) -> dict:
        """Pause the VM and write its state to ``dest/vmstate.bin`` (the VM stays paused).

        A VM whose RAM is shared (a memfd, or a file) writes device state only and a sparse copy of its RAM
        to ``memory_path`` (default ``dest/memory.ram``; with ``final`` a RAM file may be moved there: the
        caller discards the VM). Any other VM (a restored one) writes a full migration stream."""
        from banger.host.fsutil import reflink_or_sparse_copy
        from banger.vmm.qemu.qmp import Qmp

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / SNAPSHOT_FILE
        ram = self._ram_source(handles)
        mem_out = Path(memory_path) if memory_path else dest / MEMORY_FILE
        timings = {}
        t0 = time.monotonic()
        try:
            with Qmp(handles["qmp"], timeout=30).connect() as q:
                if q.status() == "running":
                    q.execute("stop")
                timings["paused_ms"] = round((time.monotonic() - t0) * 1000, 1)
                self._migrate_out(q, out, ignore_shared=bool(ram))
            timings["state_ms"] = round((time.monotonic() - t0) * 1000, 1)
            if ram:
                moved = False
                if final and handles.get("memory_file"):
                    try:
                        os.rename(ram, mem_out)
                        moved = True
                    except OSError:  # EXDEV: the RAM file lives on another filesystem
                        pass
                if not moved:
                    reflink_or_sparse_copy(ram, mem_out)
                timings["ram_ms"] = round((time.monotonic() - t0) * 1000, 1)
        except BaseException:
            out.unlink(missing_ok=True)
            if ram:
                mem_out.unlink(missing_ok=True)
            raise
        meta = {"backend": self.name, "files": {"state": SNAPSHOT_FILE}, "state_bytes": out.stat().st_size,
                "argv_accel": self._accel(), "snapshot_timings": timings}
        if ram:
            name = mem_out.name if mem_out.parent == dest else str(mem_out)
            meta.update(files={"state": SNAPSHOT_FILE, "memory": name}, memory_file=name, ignore_shared=True,
                        memory_bytes=mem_out.stat().st_blocks * 512)
        return meta

    def _incoming(self, q, fd: int, *, ignore_shared: bool, resume: bool, deadline: float) -> None:
        self._ignore_shared(q, ignore_shared)
        q.execute("getfd", {"fdname": "bangerrestore"}, fds=[fd])
        # no self-announce after the load: QEMU would broadcast RARPs (and ask the guest for gratuitous
        # ARPs) with the SOURCE's MAC, teaching the bridge that the source lives on the clone's TAP: the
        # running source went unreachable until it sent a frame itself (found by the smoke suite). The
        # clone announces its own address once re-addressed.
        q.execute("migrate-set-parameters", {"announce-rounds": 0})
        q.execute("migrate-incoming", {"uri": "fd:bangerrestore"})
        interval = 0.001  # a device-only state loads in a few ms
        while True:
            st = q.status()
            if st == "running":
                if not resume:
                    q.execute("stop")
                return
            if st == "paused" and q.execute("query-migrate").get("status") == "completed":
                if resume:
                    q.execute("cont")
                return
            if st not in ("inmigrate", "paused", "prelaunch", "restore-vm", "finish-migrate"):
                raise ExternalError(f"QEMU restore ended in state {st!r}",
                                    "the snapshot may be from another QEMU version")
            if time.monotonic() >= deadline:
                raise GuestTimeout("QEMU restore did not finish within 600s", "try again")
            time.sleep(interval)
            interval = min(0.01, interval * 2)

    def cancel_snapshot(self, handles: dict, timeout: float = 30.0) -> None:
        """Abort an outgoing migration left running by a snapshot whose command died (QEMU keeps writing
        the stream to the file it was handed); the guest stays paused. No-op without one."""
        from banger.vmm.qemu.qmp import Qmp

        with Qmp(handles["qmp"], timeout=10).connect() as q:
            if q.execute("query-migrate").get("status") in ("setup", "active", "pre-switchover", "device"):
                q.execute("migrate_cancel")
            deadline = time.monotonic() + timeout
            while q.execute("query-migrate").get("status") in ("setup", "active", "pre-switchover", "device",
                                                               "cancelling"):
                if time.monotonic() > deadline:
                    raise GuestTimeout("QEMU did not cancel the snapshot migration in time", "run banger gc again")
                time.sleep(0.05)

    def restore(self, spec: VmSpec, snapshot_dir: Path, meta: dict, progress=None) -> dict:
        """Start QEMU with ``-incoming defer`` and feed it the migration stream; the VM resumes running.

        A shared-memory snapshot (``meta["memory_file"]``) maps its RAM file privately (copy-on-write:
        clones of one snapshot share every page none of them wrote) and loads device state only."""
        t0 = time.monotonic()
        sdir = Path(snapshot_dir)
        mem = meta.get("memory_file")
        if mem:
            if not (sdir / mem).is_file():
                raise NotFound(f"snapshot memory file missing: {sdir / mem}",
                               "the snapshot is incomplete; delete and re-create it")
            spec.extra = {**(spec.extra or {}), "memory_file": {"path": str(sdir / mem), "share": False}}
        handles = self._spawn(spec, incoming=True)
        timings = {}
        try:
            fd = os.open(sdir / meta.get("files", {}).get("state", SNAPSHOT_FILE), os.O_RDONLY)
            try:
                with self._wait_qmp(handles) as q:
                    timings["vmm_ready_ms"] = round((time.monotonic() - t0) * 1000, 1)
                    self._incoming(q, fd, ignore_shared=bool(mem), resume=True, deadline=time.monotonic() + 600)
            finally:
                os.close(fd)
        except BaseException:
            self.kill(handles)
            raise
        timings["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
        handles.update(restored_from=str(sdir), mem_backend="file-private" if mem else "stream",
                       restore_timings=timings)
        return handles

    def make_shareable(self, spec: VmSpec, snapshot_dir: Path, meta: dict, progress=None, *,
                       memory_path: Path | None = None) -> dict:
        """Turn a full snapshot in ``snapshot_dir`` into a shared-memory one (restore's module doc).

        A loader QEMU (paused, never runs the guest; RAM = ``snapshot_dir/memory.ram`` shared) loads the
        full stream, then writes device state only (``x-ignore-shared``) as the new vmstate.bin.
        ``spec`` describes the snapshot's VM (same devices; its drives are only opened).  The RAM file
        goes to ``memory_path`` (default beside the state; a tmpfs path makes the load several times
        faster: every first write to a page of a shared ext4 mapping allocates a block)."""
        from banger.vmm.qemu.qmp import Qmp

        if meta.get("memory_file"):
            return meta
        sdir = Path(snapshot_dir)
        mem = Path(memory_path) if memory_path else sdir / MEMORY_FILE
        state = sdir / meta.get("files", {}).get("state", SNAPSHOT_FILE)
        full = sdir / FULL_STATE_FILE
        os.rename(state, full)
        spec.extra = {**(spec.extra or {}), "memory_file": {"path": str(mem), "share": True},
                      "paused": True, "loader_tap": f"bgl{os.urandom(4).hex()}"}
        spec.tap = None
        handles = self._spawn(spec, incoming=True)
        try:
            fd = os.open(full, os.O_RDONLY)
            try:
                with self._wait_qmp(handles) as q:
                    self._incoming(q, fd, ignore_shared=False, resume=False, deadline=time.monotonic() + 600)
            finally:
                os.close(fd)
            with Qmp(handles["qmp"], timeout=30).connect() as q:
                self._migrate_out(q, sdir / SNAPSHOT_FILE, ignore_shared=True)
        except BaseException as e:
            os.replace(full, state)
            mem.unlink(missing_ok=True)
            if isinstance(e, ExternalError):
                raise ExternalError(f"the loader QEMU could not make the snapshot's memory shareable: {e.message}\n"
                                    f"{log_tail(Path(handles['vmm_log']))}", e.hint) from None
            raise
        finally:
            self.kill(handles)
        full.unlink()
        name = mem.name if mem.parent == sdir else str(mem)
        return {**meta, "files": {"state": SNAPSHOT_FILE, "memory": name}, "memory_file": name,
                "ignore_shared": True, "state_bytes": (sdir / SNAPSHOT_FILE).stat().st_size}

