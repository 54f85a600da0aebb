"""QEMU backend: `-M microvm` with virtio-mmio devices, controlled through QMP.

The argv is built by a pure function (``build_argv``) so it can be unit-tested.
QEMU is spawned detached (new session) and found again through pid + start time.
Serial console: the chardev is one end of a socketpair whose other end belongs to the VM's
console pump (banger/guest/console.py), started just before QEMU: it writes what the guest
prints to a size-capped, rotated ``serial.log`` and forwards what banger writes to its
control socket ``serial.sock`` (the ``@banger net ...`` line for banger-init) into the guest.
(QEMU's own ``logfile=`` has no size bound: a guest printing forever would fill the disk.)
QMP on a second unix socket answers status / stop / cont / quit / migration.

Snapshots are QEMU migration streams written to a file descriptor handed over
with QMP ``getfd`` (no ``exec:`` shell URIs); restore starts QEMU with
``-incoming defer`` and feeds the same kind of fd to ``migrate-incoming``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from banger.errors import ExternalError, GuestTimeout
from banger.host import procs
from banger.vmm.base import VmSpec

QMP_SOCK = "qmp.sock"
SERIAL_SOCK = "serial.sock"
VMM_LOG = "qemu.log"
SNAPSHOT_FILE = "vmstate.bin"


def build_argv(spec: VmSpec, *, qemu_bin: str, accel: str, serial_fd: int, incoming: bool = False) -> list[str]:
    """The full QEMU command line for ``spec`` (no shell involved); ``serial_fd`` is QEMU's (inherited)
    end of the console socketpair."""
    run = Path(spec.run_dir)
    kernel = spec.vmlinux if spec.vmlinux and Path(spec.vmlinux).exists() else spec.bzimage
    if kernel is None:
        kernel = spec.vmlinux
    argv = [qemu_bin,
            "-name", f"banger-{spec.name},debug-threads=off",
            "-M", "microvm,acpi=on,pit=on,pic=on,rtc=on",
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
    for d in spec.drives:
        opts = f"file={d.path},if=none,id={d.drive_id},format=raw,cache=unsafe,discard=unmap"
        if d.read_only:
            opts = f"file={d.path},if=none,id={d.drive_id},format=raw,readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive={d.drive_id}"]
    if spec.tap:
        argv += ["-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
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
        handles = self._spawn(spec)
        try:
            with self._wait_qmp(handles) as q:
                st = q.status()
                if st != "running":
                    q.execute("cont")
        except BaseException:
            self.kill(handles)
            raise
        return handles

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

    def send_console(self, handles: dict, line: str, timeout: float = 5.0) -> None:
        """Write one line to the guest's serial console input (banger-init's control channel)."""
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(handles["serial_sock"])
            s.sendall(line.rstrip("\n").encode() + b"\n")
            # The console pump reads it and queues it for QEMU (whose UART only takes a FIFO's worth at a
            # time); wait until the pump took every byte (SIOCOUTQ == 0) before hanging up.
            import fcntl
            import struct
            import termios

            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pending = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                if pending == 0:
                    break
                time.sleep(0.01)
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
            time.sleep(0.05)

    def snapshot(self, handles: dict, dest: Path) -> dict:
        """Pause the VM and write its device + memory state to ``dest/vmstate.bin`` (the VM stays paused)."""
        from banger.vmm.qemu.qmp import Qmp

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / SNAPSHOT_FILE
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with Qmp(handles["qmp"], timeout=30).connect() as q:
                if q.status() == "running":
                    q.execute("stop")
                q.execute("getfd", {"fdname": "bangersnap"}, fds=[fd])
                os.close(fd)
                fd = -1
                q.execute("migrate", {"uri": "fd:bangersnap"})
                self._migrate_wait(q, "snapshot", 600)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        return {"backend": self.name, "files": {"state": SNAPSHOT_FILE}, "state_bytes": out.stat().st_size,
                "argv_accel": self._accel()}

    def restore(self, spec: VmSpec, snapshot_dir: Path, meta: dict, progress=None) -> dict:
        """Start QEMU with ``-incoming defer`` and feed it the migration stream; the VM resumes running."""

        handles = self._spawn(spec, incoming=True)
        try:
            fd = os.open(Path(snapshot_dir) / meta.get("files", {}).get("state", SNAPSHOT_FILE), os.O_RDONLY)
            try:
                with self._wait_qmp(handles) as q:
                    q.execute("getfd", {"fdname": "bangerrestore"}, fds=[fd])
                    # no self-announce after the load: QEMU would broadcast RARPs (and ask the guest for
                    # gratuitous ARPs) with the SOURCE's MAC, teaching the bridge that the source lives on
                    # the clone's TAP: the running source went unreachable until it sent a frame itself
                    # (found by the smoke suite). The clone announces its own address (guest.net).
                    q.execute("migrate-set-parameters", {"announce-rounds": 0})
                    q.execute("migrate-incoming", {"uri": "fd:bangerrestore"})
                    deadline = time.monotonic() + 600
                    while True:
                        st = q.status()
                        if st == "running":
                            break
                        if st == "paused" and q.execute("query-migrate").get("status") == "completed":
                            q.execute("cont")
                            break
                        if st not in ("inmigrate", "paused", "prelaunch", "restore-vm", "finish-migrate"):
                            raise ExternalError(f"QEMU restore ended in state {st!r}",
                                                "the snapshot may be from another QEMU version")
                        if time.monotonic() >= deadline:
                            raise GuestTimeout("QEMU restore did not finish within 600s", "try again")
                        time.sleep(0.05)
            finally:
                os.close(fd)
        except BaseException:
            self.kill(handles)
            raise
        return handles

