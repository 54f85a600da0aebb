"""The UFFD page-fault handler process: ``python -m banger.uffd.handler SOCKET --mem-file FILE ...``.

Lifecycle:
 1. listen on SOCKET (published by rename once listening), load the access log;
 2. accept ONE connection within --connect-timeout, validate the handshake
    (a bad one: close the connection, kill the peer if it is the VMM);
 3. serve faults in the C loop (GIL released) on a thread while this thread
    runs the policy: record first touches until the fault rate settles, then
    write the access log and fill the rest sequentially; or replay a log
    (on a host with more than one CPU a second C thread copies the plan too);
 4. exit 0 when the VMM goes away (connection hang-up or its pid exits);
    on any failure after the handshake (or SIGTERM/SIGINT/SIGHUP) SIGKILL the
    VMM, because a guest whose handler is gone freezes forever.
A stats JSON (--stats) is written atomically on every exit path.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import threading
import time

from banger.errors import BangerError
from banger.host.fsutil import atomic_write_json
from banger.uffd import _uffd, policy
from banger.uffd import handshake as hs


class _Terminated(Exception):
    pass


def _log(msg: str) -> None:
    sys.stderr.write(f"banger-uffd[{os.getpid()}] {time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    for _ in range(256):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data[data.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 0 or pid in out:
            break
        out.add(pid)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m banger.uffd.handler",
                                 description="banger's userfaultfd page-fault handler for Firecracker restores")
    ap.add_argument("socket", help="AF_UNIX socket path to listen on (Firecracker's mem_backend.backend_path)")
    ap.add_argument("--mem-file", required=True, help="the snapshot's memory file")
    ap.add_argument("--access-log", help="access log beside the snapshot: replayed if present, recorded if not")
    ap.add_argument("--stats", help="write a stats JSON here on exit")
    ap.add_argument("--no-prefetch", action="store_true", help="serve faults on demand only; record nothing")
    ap.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the VMM to connect")
    ap.add_argument("--handshake-timeout", type=float, default=10.0,
                    help="seconds to wait for the handshake message once connected")
    ap.add_argument("--vmm-pid", type=int, help="only this pid may connect (SO_PEERCRED)")
    ap.add_argument("--batch-bytes", type=int, default=1 << 20, help="largest prefetch copy per UFFDIO_COPY")
    ap.add_argument("--busy-batch-bytes", type=int, default=256 << 10,
                    help="largest prefetch copy while faults are arriving (what a fault may wait behind)")
    ap.add_argument("--fault-around-bytes", type=int, default=64 << 10,
                    help="planned, missing memory copied along with a faulting page")
    ap.add_argument("--settle-interval", type=float, default=0.25, help="recording: seconds per fault-rate sample")
    ap.add_argument("--settle-faults", type=int, default=16,
                    help="recording: an interval with fewer new pages than this is quiet")
    ap.add_argument("--settle-intervals", type=int, default=8,
                    help="recording: this many quiet intervals in a row settle it")
    ap.add_argument("--no-fill", action="store_true", help="no sequential background fill")
    ap.add_argument("--copy-threads", type=int, choices=(1, 2), default=None,
                    help="threads copying a replayed prefetch plan (default 2 when this process may run on "
                         "more than one CPU, else 1; 1 forces the serving thread alone)")
    ap.add_argument("--copier-batch-bytes", type=int, default=128 << 10,
                    help="largest copy of the second copy thread (what an event read may wait behind)")
    ap.add_argument("--plan-order", choices=("touch", "chunked"), default="touch",
                    help="replay plan: runs in first-touch order (touch) or sorted within growing chunks")
    ap.add_argument("--refresh-min-pages", type=int, default=64,
                    help="replay: rewrite the access log when at least this many pages outside it "
                         "(and 5%% of its size) were touched")
    ap.add_argument("--no-refresh", action="store_true", help="replay: never rewrite the access log")
    return ap


def _default_copy_threads() -> int:
    """A second copy thread (it helps replayed plans only) when this process may use a second CPU."""
    try:
        return 2 if len(os.sched_getaffinity(0)) > 1 else 1
    except OSError:
        return 1


class Handler:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.t0 = time.monotonic_ns()
        self.stats: dict = {"ok": False, "pid": os.getpid(), "socket": args.socket, "mem_file": args.mem_file,
                            "prefetch": not args.no_prefetch, "mode": "on_demand"}
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.fds: list[int] = []  # fds we own and must close
        self.peer: hs.PeerCred | None = None
        self.peer_sent_uffd = False
        self.handshake_done = False
        self.server = None
        self.terminated: str | None = None
        self.t_handshake = 0
        self.socket_ino = -1

    # -- helpers --------------------------------------------------------------
    def _ms(self, t_ns: int, since: int | None = None) -> float | None:
        if not t_ns:
            return None
        return round((t_ns - (self.t0 if since is None else since)) / 1e6, 3)

    def _on_signal(self, signum, frame):
        self.terminated = signal.Signals(signum).name
        if self.server is not None:
            self.server.stop()
        elif not self.handshake_done:
            raise _Terminated(self.terminated)

    def _kill_peer(self, why: str) -> None:
        p = self.peer
        if p is None or p.pid <= 1 or p.pid == os.getpid():
            return
        if p.pid in _ancestors():
            _log(f"not killing peer pid {p.pid}: it is an ancestor of this handler, not a VMM ({why})")
            return
        if p.pidfd < 0:
            _log(f"could not kill the VMM (pid {p.pid}): no pidfd for it ({why})")
            return
        try:
            # through the pidfd taken at accept: never a process that reused the pid
            signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)
            self.stats["peer_killed"] = True
            _log(f"killed the VMM (pid {p.pid}): {why}")
        except ProcessLookupError:
            pass
        except PermissionError as e:
            _log(f"could not kill the VMM (pid {p.pid}): {e}")

    # -- phases ---------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        rc = 0
        try:
            self._run()
            self.stats["ok"] = True
        except _Terminated as e:
            err = hs.HandlerFailed(f"the UFFD handler was terminated ({e}) before serving",
                                   "nothing to do: whoever stopped it is cleaning up")
            self.stats["error"] = err.to_dict()
            rc = 1
            if self.peer_sent_uffd:
                self._kill_peer("handler terminated during the handshake")
        except BangerError as e:
            self.stats["error"] = e.to_dict()
            rc = e.exit_code
            _log(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""))
            if self.handshake_done or self.peer_sent_uffd:
                self._kill_peer(e.message)
        except Exception as e:  # a bug: still take the VMM down and say so
            self.stats["error"] = {"code": "uffd_failed", "message": f"{type(e).__name__}: {e}",
                                   "hint": "this is a banger bug; the handler log has details"}
            rc = 1
            import traceback

            traceback.print_exc()
            if self.handshake_done or self.peer_sent_uffd:
                self._kill_peer(str(e))
        finally:
            self._cleanup()
            self.stats["exit_code"] = rc
            self.stats["exit_ms"] = self._ms(time.monotonic_ns())
            if self.a.stats:
                try:
                    atomic_write_json(self.a.stats, self.stats)
                except OSError as e:
                    _log(f"could not write stats to {self.a.stats}: {e}")
        return rc

    def _cleanup(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self._unlink_socket()
        if self.conn is not None:
            self.conn.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def _unlink_socket(self) -> None:
        try:
            st = os.lstat(self.a.socket)
            if st.st_ino == self.socket_ino:  # ours, not a successor's
                os.unlink(self.a.socket)
        except OSError:
            pass

    def _run(self) -> None:
        a = self.a
        try:
            mem_fd = os.open(a.mem_file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise hs.HandshakeError(f"memory file {a.mem_file} does not exist",
                                    "the snapshot is incomplete; re-create it") from None
        self.fds.append(mem_fd)
        mem_size = os.fstat(mem_fd).st_size
        self.stats["mem_size"] = mem_size

        self.listener = hs.listen(a.socket)
        self.socket_ino = os.lstat(a.socket).st_ino
        self.stats["listening_ms"] = self._ms(time.monotonic_ns())
        _log(f"listening on {a.socket}")

        # Load the log while nobody is connected yet (its page size is in its header).
        log_pages = log_plan = None
        log_page_size = None
        if not a.no_prefetch and a.access_log:
            log_page_size = policy.peek_log_page_size(a.access_log)
            if log_page_size is not None:
                try:
                    log_pages = policy.read_log(a.access_log, log_page_size, mem_size)
                except policy.LogInvalid as e:
                    _log(f"ignoring access log {a.access_log}: {e}")
                    self.stats["log_ignored"] = str(e)
                if log_pages is not None:
                    npages = mem_size // log_page_size
                    log_plan = policy.plan_from_touch_order(log_pages, npages) if a.plan_order == "touch" \
                        else policy.plan_from_log(log_pages, npages)
                    self._advise(mem_fd, log_plan, log_page_size)

        self.conn, self.peer = hs.accept(self.listener, a.connect_timeout)
        if self.peer.pidfd >= 0:
            self.fds.append(self.peer.pidfd)
        t_conn = time.monotonic_ns()
        self.stats["connected_ms"] = self._ms(t_conn)
        self.stats["peer"] = {"pid": self.peer.pid, "uid": self.peer.uid, "gid": self.peer.gid}
        # Firecracker connects once: stop listening and take the socket file away.
        self._unlink_socket()
        self.listener.close()
        self.listener = None
        _log(f"VMM connected (pid {self.peer.pid})")
        if a.vmm_pid and self.peer.pid != a.vmm_pid:
            peer, self.peer = self.peer, None  # a stranger: never kill it
            raise hs.HandshakeError(f"pid {peer.pid} connected to the UFFD socket, expected the VMM pid {a.vmm_pid}",
                                    "another process raced for the socket; retry the restore")

        data, fds = hs.receive(self.conn, a.handshake_timeout)
        self.fds.extend(fds)
        self.peer_sent_uffd = bool(fds)
        regions, page_size, ignored = hs.parse_regions(data, mem_size)
        uffd, features = hs.check_uffd(fds)
        self.t_handshake = time.monotonic_ns()
        self.stats.update({
            "handshake_ms": self._ms(self.t_handshake, t_conn), "page_size": page_size,
            "regions": [{"base": r.base, "size": r.size, "offset": r.offset} for r in regions],
            "uffd_features": features, "ignored_fields": ignored,
        })
        _log(f"handshake: {len(regions)} region(s), page size {page_size}")

        record = 0  # 1: every first touch (no log yet); 2: pages a replayed log lacks
        plan = None
        if a.no_prefetch:
            self.stats["mode"] = "on_demand"
        elif log_plan is not None and log_page_size == page_size:
            plan = log_plan
            self.stats.update(mode="replay", log_pages=len(log_pages), plan_runs=len(plan) // 2,
                              plan_pages=policy.plan_pages(plan), plan_order=a.plan_order)
            if not a.no_refresh:
                record = 2  # pages the log lacks: merged into it when there are many
        elif a.access_log:
            record = 1
            self.stats["mode"] = "record"
        elif not a.no_fill:
            plan = policy.fill_plan(regions, page_size)
            self.stats.update(mode="fill", plan_pages=policy.plan_pages(plan))

        pid_fd = self.peer.pidfd  # the loop ends when it fires (the VMM exited)

        copy_threads = a.copy_threads or _default_copy_threads()
        self.stats["copy_threads"] = copy_threads if self.stats["mode"] == "replay" else 1  # who copies the plan
        try:
            server = _uffd.Server(uffd, mem_fd, [(r.base, r.size, r.offset) for r in regions], page_size,
                                  conn_fd=self.conn.fileno(), pid_fd=pid_fd, record=record,
                                  batch_pages=max(1, a.batch_bytes // page_size),
                                  busy_batch_pages=max(1, a.busy_batch_bytes // page_size),
                                  fault_around=a.fault_around_bytes // page_size,
                                  copy_threads=copy_threads,
                                  copier_batch_pages=max(1, a.copier_batch_bytes // page_size))
        except (ValueError, OSError) as e:
            raise hs.HandlerFailed(f"cannot serve this memory layout: {e}",
                                   "the snapshot's memory file does not match its regions; re-create it") from None
        if plan is not None:
            # a replayed log is what the guest is about to touch: both copy threads on it; a fill is
            # background work and keeps to one thread (the guest runs meanwhile)
            server.set_plan(plan.tobytes(), copier=self.stats["mode"] == "replay")
        self.handshake_done = True
        self.server = server
        if self.terminated:  # a signal that landed between the handshake and here
            server.stop()
        self._serve(server, record, regions, page_size, mem_size)

    def _advise(self, mem_fd: int, plan, page_size: int) -> None:
        """Ask for the logged pages' file data to be read ahead while the VMM is still starting (on a
        thread: the restore must not wait for it; from a warm page cache it is skipped)."""
        data = plan.tobytes()

        def go():
            try:
                self.stats["readahead_runs"] = _uffd.readahead(mem_fd, data, page_size)
            except OSError as e:
                self.stats["readahead_error"] = str(e)

        threading.Thread(target=go, name="uffd-readahead", daemon=True).start()

    def _serve(self, server, record: int, regions, page_size: int, mem_size: int) -> None:
        a = self.a
        outcome: dict = {}

        def loop():
            try:
                outcome["reason"] = server.run()
            except BaseException as e:  # noqa: B036 - reported by the main thread
                outcome["error"] = e

        t = threading.Thread(target=loop, name="uffd-serve", daemon=True)
        t.start()
        self.stats["serving_ms"] = self._ms(time.monotonic_ns(), self.t_handshake)
        settler = policy.Settler(a.settle_faults, a.settle_intervals)
        log_written = False
        while t.is_alive():
            t.join(a.settle_interval if record else 1.0)
            if record and t.is_alive() and settler.observe(server.stats()["recorded"]):
                if record == 1:
                    log_written = self._write_log(server, page_size, mem_size, "settled")
                else:
                    log_written = self._refresh_log(server, page_size, mem_size, "settled")
                server.set_record(0)
                if record == 1 and not a.no_fill:
                    server.set_plan(policy.fill_plan(regions, page_size).tobytes())
                record = 0
        self.stats["serve"] = self._server_stats(server)
        if record == 1 and not log_written and server.stats()["recorded"]:
            self._write_log(server, page_size, mem_size, "vmm_exit")
        elif record == 2 and not log_written:
            self._refresh_log(server, page_size, mem_size, "vmm_exit")
        if "error" in outcome:
            e = outcome["error"]
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                raise hs.HandshakeError(f"{e.strerror}; its guest would read zeros there",
                                        "the VMM was stopped: its UFFD handshake names memory it did not "
                                        "register with the userfaultfd; check the Firecracker version") from None
            raise hs.HandlerFailed(f"serving page faults failed: {e}",
                                   "the VMM was stopped because its guest would freeze; check the memory file "
                                   "and the handler log") from None
        reason = outcome.get("reason")
        self.stats["exit_reason"] = reason
        if reason == "stopped":
            raise hs.HandlerFailed(f"the UFFD handler was stopped ({self.terminated or 'stop'}) while the VMM ran",
                                   "the VMM was stopped with it (its guest would freeze otherwise)")
        _log(f"VMM went away ({reason}); exiting")

    def _write_log(self, server, page_size: int, mem_size: int, why: str) -> bool:
        import array

        pages = array.array("I")
        pages.frombytes(server.access_log())
        try:
            policy.write_log(self.a.access_log, pages, page_size, mem_size)
        except OSError as e:
            _log(f"could not write the access log {self.a.access_log}: {e}")
            self.stats["log_error"] = str(e)
            return False
        self.stats.update(log_written=True, log_pages=len(pages), log_reason=why,
                          settled_ms=self._ms(time.monotonic_ns(), self.t_handshake))
        _log(f"access log written: {len(pages)} pages ({why})")
        return True

    def _refresh_log(self, server, page_size: int, mem_size: int, why: str) -> bool:
        """Replay saw the guest touch pages its log lacks: when there are many, append them."""
        import array

        new = array.array("I")
        new.frombytes(server.access_log())
        self.stats["unlogged_pages"] = len(new)
        if not new or len(new) < max(self.a.refresh_min_pages, self.stats.get("log_pages", 0) // 20):
            return False
        try:
            old = policy.read_log(self.a.access_log, page_size, mem_size)
        except (OSError, policy.LogInvalid) as e:
            _log(f"not refreshing the access log {self.a.access_log}: {e}")
            return False
        if old is None:  # removed meanwhile (snapshot rm): do not bring it back
            return False
        merged = policy.merge_logs(old, new)
        try:
            policy.write_log(self.a.access_log, merged, page_size, mem_size)
        except OSError as e:
            _log(f"could not refresh the access log {self.a.access_log}: {e}")
            self.stats["log_error"] = str(e)
            return False
        self.stats.update(log_refreshed=True, log_pages_after=len(merged), log_reason=why)
        _log(f"access log refreshed: {len(new)} new pages, {len(merged)} in all ({why})")
        return True

    def _server_stats(self, server) -> dict:
        s = server.stats()
        out = {k: v for k, v in s.items() if not k.endswith("_ns")}
        for k in ("first_fault_ns", "last_fault_ns", "plan_done_ns"):
            out[k.replace("_ns", "_ms")] = self._ms(s[k], self.t_handshake)
        out["service_ms_total"] = round(s["service_ns"] / 1e6, 3)
        out["service_max_us"] = round(s["service_max_ns"] / 1e3, 1)
        out["service_mean_us"] = round(s["service_ns"] / 1e3 / max(1, s["fault_pages"] + s["zero_pages"]), 2)
        out["prefetch_ms"] = round(s["prefetch_ns"] / 1e6, 3)
        out["serve_cpu_ms"] = round(s["serve_cpu_ns"] / 1e6, 3)
        out["copier_cpu_ms"] = round(s["copier_cpu_ns"] / 1e6, 3)
        out["ev_wait_ms"] = round(s["ev_wait_ns"] / 1e6, 3)
        out["pages_copied"] = s["fault_pages"] + s["prefetch_pages"] + s["zero_pages"]
        return out


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # banger.config.PRIVATE_UMASK: the access log it writes is private
    args = build_parser().parse_args(argv)
    return Handler(args).run()


if __name__ == "__main__":
    sys.exit(main())
