"""Guest access over SSH: a pinned-host-key transport, `vm ssh-config`, `vm cp`, the serial log path."""

from __future__ import annotations

from pathlib import Path

from banger.errors import InvalidState, UsageError
from banger.vms.runtime import (
    NET_NONE,
    PAUSED,
    RUNNING,
    SERIAL,
    effective_state,
    get,
    net_mode,
    ssh_files,
    vm_dir,
)


def running(ctx, ref: str):
    vm = get(ctx, ref)
    st = effective_state(ctx, vm)
    if st == PAUSED:
        raise InvalidState(f"VM {vm['name']} is paused: a snapshot create was killed while its guest was paused",
                           "run `banger gc` (it resumes the guest)")
    if st != RUNNING:
        raise InvalidState(f"VM {vm['name']} is {st}", f"start it: banger vm start {vm['name']}")
    return vm


def connect(ctx, ref: str):
    """An authenticated SSH transport to a running VM (host key pinned)."""
    from banger.guest import ssh

    vm = running(ctx, ref)
    if net_mode(vm) == NET_NONE:
        raise InvalidState(f"VM {vm['name']} has no network card (--net none): there is no SSH to reach",
                           f"read its console with banger vm logs {vm['name']}, or give it a network: "
                           f"banger vm stop {vm['name']} && banger vm set {vm['name']} --net isolated")
    return ssh.connect(vm["ip"], **ssh_files(ctx, vm))


def serial_log(ctx, ref: str) -> Path:
    return vm_dir(ctx, get(ctx, ref)) / SERIAL


def resolvable_name(ctx, vm) -> str | None:
    """``<name>.<domain>`` if it resolves to the VM's address here (it is in banger's block of the
    hosts file and the system resolver agrees), else None. Never asks DNS for a name not in the block."""
    import socket

    from banger.errors import BangerError
    from banger.net import hosts

    try:
        fqdn = hosts.fqdn(ctx.cfg, vm["name"])
        if (fqdn, vm["ip"]) not in hosts.entries(hosts.hosts_path(ctx.cfg)):
            return None
        found = {a[4][0] for a in socket.getaddrinfo(fqdn, None, socket.AF_INET, socket.SOCK_STREAM)}
    except (BangerError, OSError):
        return None
    return fqdn if found == {vm["ip"]} else None


def ssh_config(ctx, ref: str) -> str:
    """An OpenSSH stanza; HostName is the VM's name (``<name>.<domain>``) when that resolves, else its IP.
    The pinned host key is recorded for the IP, so HostKeyAlias keeps it matching either way."""
    vm = get(ctx, ref)
    f = ssh_files(ctx, vm)
    host = resolvable_name(ctx, vm) or vm["ip"]
    return (f"Host {vm['name']}\n"
            f"    HostName {host}\n"
            f"    HostKeyAlias {vm['ip']}\n"
            f"    User root\n"
            f"    IdentityFile {f['key_path']}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {f['known_hosts']}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    HostKeyAlgorithms ssh-ed25519\n")


def parse_cp_arg(arg: str) -> tuple[str | None, str]:
    """`VM:path` -> (VM, path); a local path (containing '/' before any ':' or no ':') -> (None, path)."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        return head, tail or "."
    return None, arg


def copy(ctx, src: str, dst: str, max_bytes: int | None = None) -> dict:
    """Copy between the host and a running guest. From a guest, every name, mode and link the guest's
    SFTP side sends is checked (banger.guest.sftpcopy); ``max_bytes`` bounds what is written."""
    from banger.guest import sftpcopy

    svm, spath = parse_cp_arg(src)
    dvm, dpath = parse_cp_arg(dst)
    if (svm is None) == (dvm is None):
        raise UsageError("exactly one of SRC and DST must be VM:path", "e.g. banger vm cp ./dir myvm:/root/")
    t = connect(ctx, svm or dvm)
    try:
        n = (sftpcopy.put(t, Path(spath), dpath) if dvm
             else sftpcopy.get(t, spath, Path(dpath), max_bytes=max_bytes))
    finally:
        t.close()
    return {"files": n, "direction": "to_guest" if dvm else "from_guest"}
