"""Real guests under QEMU (TCG here), every banger command run inside a throwaway netns.

At most two guests run at once (2-core CI). After every test the vmenv fixture checks
independently that no row, TAP, neighbour entry, process, socket or loop device is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import time
from pathlib import Path

from banger.host import procs
from tests.support.e2e import default_image, default_kernel, netns, pulled_default_kernel, vmenv, wait_for  # noqa: F401  (fixtures)
from tests.support.netns import banger_argv


def _stdout_json(cp):
    return json.loads(cp.stdout)


def _on_a_tty(argv: list[str], env: dict, timeout: float = 120) -> str:
    """Run ``argv`` with its stdout on a pseudo-terminal; return what reached the terminal."""
    import pty

    m, s = pty.openpty()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=s, stderr=subprocess.PIPE, env=env)
    os.close(s)
    chunks = []
    try:
        while True:
            try:
                b = os.read(m, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not b:
                break
            chunks.append(b)
        p.communicate(timeout=timeout)
    finally:
        os.close(m)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def _pump(vm_dir: Path) -> tuple[int, int]:
    h = json.loads((vm_dir / "handles.json").read_text())
    return h["console_pid"], h["console_pid_start"]


def test_vm_run_rm_prints_guest_kernel_version(vmenv, default_kernel):  # noqa: F811
    cp = vmenv.banger("vm", "run", "--rm", "--name", "run-1", "--", "uname", "-r", timeout=300)
    assert cp.stdout.strip() == default_kernel["version"], cp.stderr
    assert vmenv.banger_json("vm", "list")["data"] == []


def test_lifecycle_keeps_root_data_exec_status_cp_and_crash(vmenv, tmp_path):  # noqa: F811
    env = vmenv
    cap = 64 * 1024
    (env.home / "config.toml").write_text(f"console_log_max_kib = {cap // 1024}\n")
    v = env.banger_json("vm", "create", "--name", "life-1", "--memory", "512", timeout=300)["data"]
    vdir = Path(v["dir"])
    assert v["state"] == "running"
    stages = [s["stage"] for s in v["stages"] if s["op"] == "create"]
    assert stages == ["prepare", "disk.work", "disk.overlay", "net.tap", "vmm.launch", "guest.ssh"]
    t = v["timings"]
    assert 0 < t["vmm_ready_s"] < t["ssh_ready_s"]

    # exec: the guest's exit status becomes ours; output streams through
    cp = env.banger("vm", "exec", "life-1", "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (cp.returncode, cp.stdout, cp.stderr.strip().splitlines()[-1]) == (7, "out\n", "err")
    env.banger("vm", "exec", "life-1", "--", "sh", "-c", "echo keep-me > /root/data.txt && sync")
    assert env.banger("vm", "exec", "life-1", "--", "hostname").stdout.strip() == "life-1"

    # cp round trip of a directory tree
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(70000))
    (src / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "sub" / "deeper" / "run.sh", 0o755)
    env.banger("vm", "cp", str(src), "life-1:/root/")
    assert env.banger("vm", "exec", "life-1", "--", "/root/tree/sub/deeper/run.sh").stdout == "hi\n"
    back = tmp_path / "back"
    back.mkdir()
    env.banger("vm", "cp", "life-1:/root/tree", str(back))
    for rel in ("a.txt", "sub/b.bin", "sub/deeper/run.sh"):
        assert (back / "tree" / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert os.stat(back / "tree/sub/deeper/run.sh").st_mode & 0o777 == 0o755

    # a guest's setuid shell reaches the host without the bit, owned by root, without group/other write;
    # a link to a guest path outside the copy is skipped, and said so
    env.banger("vm", "exec", "life-1", "--", "sh", "-c", "mkdir -m 2777 /root/d && install -m 4755 /bin/sh "
                                                         "/root/d/sh && ln -s /etc/shadow /root/d/shadow")
    assert env.banger("vm", "exec", "life-1", "--", "stat", "-c", "%a", "/root/d/sh").stdout.strip() == "4755"
    cp = env.banger("vm", "cp", "life-1:/root/d", str(tmp_path / "suid"))
    st = os.lstat(tmp_path / "suid" / "sh")
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0)
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o022), oct(st.st_mode)
    assert not os.lstat(tmp_path / "suid").st_mode & (stat.S_ISGID | 0o022)
    assert not os.path.lexists(tmp_path / "suid" / "shadow") and "shadow" in cp.stderr

    # the guest floods its console (escape sequences included): serial.log and its one rotation stay
    # under the cap, `vm logs` still ends with the newest line, and a terminal never sees the escapes
    nonce = secrets.token_hex(4)
    t0 = time.monotonic()
    env.banger("vm", "exec", "life-1", "--", "sh", "-c",
               "yes 'flood \033[31mred\033[0m \033]0;pwned\007 line' | head -c 600000 > /dev/ttyS0; "
               f"echo END-{nonce} > /dev/ttyS0", timeout=600)
    flood_s = time.monotonic() - t0
    wait_for(lambda: f"END-{nonce}" in env.banger("vm", "logs", "life-1").stdout, 60, "the last console line")
    sizes = [(vdir / n).stat().st_size for n in ("serial.log", "serial.log.1")]
    assert all(0 < n <= cap for n in sizes), sizes
    raw = env.banger("vm", "logs", "life-1", "--raw").stdout
    assert "\x1b]0;pwned\x07" in raw and f"END-{nonce}" in raw
    shown = _on_a_tty(banger_argv("vm", "logs", "life-1"), env.env)
    assert f"END-{nonce}" in shown and "flood red  line" in shown
    assert not [c for c in shown if ord(c) < 32 and c not in "\r\n\t" or 0x7f <= ord(c) <= 0x9f]
    doc = env.banger_json("vm", "logs", "life-1")["data"]["log"]  # --json is sanitized too
    assert f"END-{nonce}" in doc and "\x1b" not in doc and "\x07" not in doc
    print(f"console flood: 600000 bytes in {flood_s:.1f}s, kept {sizes} bytes")
    pump = _pump(vdir)
    assert procs.alive(*pump)

    # ssh-config pins the injected host key (HostName: the VM's name, which resolves in this netns)
    cfg_text = env.banger("vm", "ssh-config", "life-1").stdout
    assert "StrictHostKeyChecking yes" in cfg_text and "HostName life-1.banger" in cfg_text
    assert f"HostKeyAlias {v['ip']}" in cfg_text
    kh = next(line.split()[1] for line in cfg_text.splitlines() if "UserKnownHostsFile" in line)
    assert open(kh).read().startswith(f"{v['ip']} ssh-ed25519 ")

    # graceful stop, settings on the stopped VM, start again: /root survives
    s = env.banger_json("vm", "stop", "life-1", timeout=120)["data"]
    assert s["state"] == "stopped" and s["error"] is None  # powered off by itself, not forced
    assert not procs.alive(*pump)  # the console pump went with its VMM
    assert not [x for x in env.links(details=True) if (x.get("linkinfo") or {}).get("info_kind") == "tun"
                and x.get("operstate") == "UP" and "LOWER_UP" in x.get("flags", [])]
    env.banger_json("vm", "set", "life-1", "--work-disk-size", "3G", "--vcpu", "2")
    bad = env.banger_json("vm", "set", "life-1", "--work-disk-size", "1G", check=False)
    assert bad["_exit"] == 2 and "only grows" in bad["error"]["message"]
    env.banger_json("vm", "start", "life-1", timeout=300)
    pump = _pump(vdir)
    assert procs.alive(*pump)
    assert env.banger("vm", "exec", "life-1", "--", "cat", "/root/data.txt").stdout == "keep-me\n"
    assert env.banger("vm", "exec", "life-1", "--", "nproc").stdout.strip() == "2"
    size_kb = int(env.banger("vm", "exec", "life-1", "--", "df", "-k", "--output=size", "/root").stdout.split()[-1])
    assert size_kb > 2.5 * 1024 * 1024

    # a running VM refuses a plain delete
    busy = env.banger_json("vm", "delete", "life-1", check=False)
    assert busy["_exit"] == 4 and busy["error"]["code"] == "invalid_state"

    # the VMM dies behind banger's back: shown as crashed, never running; start recovers it
    pid = env.banger_json("vm", "show", "life-1")["data"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: env.banger_json("vm", "show", "life-1")["data"]["state"] == "crashed", 30, "crashed state")
    wait_for(lambda: not procs.alive(*pump), 30, "the console pump to exit after its VMM died")
    env.banger_json("vm", "delete", "-f", "life-1")


def test_parallel_creates_overlap_and_duplicate_fails_fast(vmenv):  # noqa: F811
    env = vmenv
    names = ["par-a", "par-b", "par-a"]
    import threading

    procs = [(n, time.monotonic(), env.spawn(banger_argv("vm", "create", "--name", n, "--json"))) for n in names]
    results = [None] * len(procs)

    def collect(i, n, t0, p):  # each process's own exit time, not the order we happen to reap them in
        out, err = p.communicate(timeout=400)
        results[i] = (n, p.returncode, time.monotonic() - t0, json.loads(out), err)

    threads = [threading.Thread(target=collect, args=(i, *pr)) for i, pr in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(420)
    ok = [r for r in results if r[1] == 0]
    failed = [r for r in results if r[1] != 0]
    assert len(ok) == 2 and len(failed) == 1, results
    fn, code, took, doc, _ = failed[0]
    assert fn == "par-a" and code == 4 and doc["error"]["code"] == "conflict"
    assert "already exists" in doc["error"]["message"] and "par-a" in doc["error"]["hint"]
    assert took < min(r[2] for r in ok), "the duplicate must fail before the others finish booting"
    assert {r[3]["data"]["name"] for r in ok} == {"par-a", "par-b"}

    # host-side phases (everything before the guest boots) overlap in time across the two creates
    def host_window(doc):
        st = [s for s in doc["data"]["stages"] if s["op"] == "create" and s["stage"] != "guest.ssh"]
        return st[0]["started_at"], max(s["started_at"] + s["duration_ms"] / 1000 for s in st)

    (a0, a1), (b0, b1) = (host_window(r[3]) for r in ok)
    assert a0 < b1 and b0 < a1, f"host-side phases did not overlap: {(a0, a1)} vs {(b0, b1)}"
    ips = {r[3]["data"]["ip"] for r in ok}
    assert len(ips) == 2
    for n in ("par-a", "par-b"):
        assert env.banger("vm", "exec", n, "--", "hostname").stdout.strip() == n
    env.banger_json("vm", "delete", "-f", "par-a", "par-b")


def test_ssh_timeout_names_the_step_shows_the_console_and_keeps_the_vm(vmenv):  # noqa: F811
    env = vmenv
    (env.home / "config.toml").write_text("ssh_timeout_s = 1.0\n")
    doc = env.banger_json("vm", "create", "--name", "slow-1", check=False, timeout=120)
    (env.home / "config.toml").unlink()
    assert doc["_exit"] == 7 and doc["error"]["code"] == "timeout", doc
    msg = doc["error"]["message"]
    assert msg.startswith("[step guest.ssh]") and "Serial console (last lines):" in msg
    # (what the tail holds depends on how far the guest got in 1 s; `vm logs` shows the same file)
    assert "banger vm delete -f slow-1" in doc["error"]["hint"]
    kept = env.banger_json("vm", "show", "slow-1")["data"]
    assert kept["state"] == "running" and kept["pid"]  # kept for inspection
    assert [s["stage"] for s in kept["stages"]][-1] == "guest.ssh" and kept["stages"][-1]["ok"] is False
    wait_for(lambda: "banger-initramfs" in env.banger("vm", "logs", "slow-1").stdout, 120, "console output")
    env.banger_json("vm", "delete", "-f", "slow-1")
