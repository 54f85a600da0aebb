"""A scripted SSH "guest": a real paramiko server on one end of a socket pair, a real client
Transport on the other, so banger's exec path (banger.guest.ssh) and the workspace's Guest talk
to it exactly as to a VM's sshd. ``answer(command_bytes) -> (stdout, stderr, status)`` decides
what the guest says; the server writes stderr *before* stdout (the order that stalls a reader
that drains stdout first) and records every command it was asked to run.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

Answer = Callable[[bytes], tuple[bytes, bytes, int]]


class ScriptedGuest:
    def __init__(self, answer: Answer):
        import paramiko

        self.answer = answer
        self.commands: list[bytes] = []
        a, b = socket.socketpair()
        self._server_sock, self._client_sock = a, b
        self.server = paramiko.Transport(a)
        self.server.add_server_key(paramiko.Ed25519Key.from_private_key(_host_key()))
        guest = self

        class Iface(paramiko.ServerInterface):
            def check_auth_none(self, username):
                return paramiko.AUTH_SUCCESSFUL

            def get_allowed_auths(self, username):
                return "none"

            def check_channel_request(self, kind, chanid):
                return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

            def check_channel_exec_request(self, channel, command):
                guest.commands.append(bytes(command))
                threading.Thread(target=guest._serve, args=(channel, bytes(command)), daemon=True).start()
                return True

        self.server.start_server(event=threading.Event(), server=Iface())  # negotiates in its own thread
        self.client = paramiko.Transport(b)
        self.client.start_client(timeout=10)
        self.client.auth_none("root")

    def _serve(self, chan, command: bytes) -> None:
        try:
            out, err, status = self.answer(command)
            if err:
                chan.sendall_stderr(err)
            if out:
                chan.sendall(out)
            chan.send_exit_status(status)
            chan.shutdown_write()
            # the client closes the channel once it has read everything; closing first could reach it
            # before the reply to its exec request (paramiko then reports "Channel closed")
            deadline = time.monotonic() + 60
            while not chan.closed and time.monotonic() < deadline:
                chan.status_event.wait(0.05)
        except Exception:  # noqa: BLE001 - the client went away (a test that timed out)
            pass
        finally:
            chan.close()

    def close(self) -> None:
        self.client.close()
        self.server.close()
        for s in (self._server_sock, self._client_sock):
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_KEY: list = []


def _host_key():
    """One throwaway ed25519 host key per test session (an OpenSSH private key, as a file object)."""
    import io

    if not _KEY:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption())
        _KEY.append(pem.decode())
    return io.StringIO(_KEY[0])
