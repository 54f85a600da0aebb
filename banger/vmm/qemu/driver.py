"""QEMU backend: `-M microvm` with virtio-mmio devices, controlled through QMP.

The argv is built by a pure function (``build_argv``) so it can be unit-tested.
QEMU is spawned detached (new session) and found again through pid + start time.
Serial console: a unix-socket chardev (its input lets banger send the control
line ``@banger net ...`` to banger-init) with ``logfile=`` so every byte the guest
prints lands in ``serial.log`` even when nobody is connected.  QMP on a second
unix socket answers status / stop / cont / quit / migration.

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


def build_argv(spec: VmSpec, *, qemu_bin: str, accel: str, incoming: bool = False) -> list[str]:
    """The full QEMU command line for ``spec`` (no shell involved)."""
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
            "-chardev", f"socket,id=ser0,path={run / SERIAL_SOCK},server=on,wait=off,"
                        f"logfile={spec.serial_log},logappend=on",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{run / QMP_SOCK},server=on,wait=off",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0"]
    for d in spec.drives:
        opts = f"file={d.path},if=none,id={d.drive_id},format=raw,cache=writeback,discard=unmap"
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
    """The last ``n`` lines of a (serial / VMM) log, without reading all of a large file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.replace("\r", "").splitlines()[-n:])


class QemuDriver:
    name = "qemu"

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- launch ----
    def _accel(self) -> str:
        from banger.host.hostinfo import qemu_accel

        return qemu_accel()

    def _spawn(self, spec: VmSpec, argv: list[str]) -> dict:
        from banger.host.runner import require

        run = Path(spec.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        for s in (QMP_SOCK, SERIAL_SOCK):
            (run / s).unlink(missing_ok=True)
        argv = [require(argv[0], "qemu-system-x86"), *argv[1:]]
        log = Path(spec.vm_dir) / VMM_LOG
        pid, start = procs.spawn_detached(argv, stdout_path=str(log))
        handles = {"backend": self.name, "pid": pid, "pid_start": start, "qmp": str(run / QMP_SOCK),
                   "serial_sock": str(run / SERIAL_SOCK), "serial_log": str(spec.serial_log),
                   "vmm_log": str(log), "tap": spec.tap, "run_dir": str(run), "argv": argv}
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
        argv = build_argv(spec, qemu_bin=self.cfg.qemu_bin, accel=self._accel())
        handles = self._spawn(spec, argv)
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
            # QEMU drops what it has not read yet when the client hangs up, and the UART only takes a
            # FIFO's worth at a time: wait until the peer consumed every byte (SIOCOUTQ == 0).
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
        """Start QEMU with ``-incoming defer`` and feed it the migration stream; the VM resumes running."""

        argv = build_argv(spec, qemu_bin=self.cfg.qemu_bin, accel=self._accel(), incoming=True)
        handles = self._spawn(spec, argv)
        try:
            fd = os.open(Path(snapshot_dir) / meta.get("files", {}).get("state", SNAPSHOT_FILE), os.O_RDONLY)
            try:
                with self._wait_qmp(handles) as q:
                    q.execute("getfd", {"fdname": "bangerrestore"}, fds=[fd])
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

