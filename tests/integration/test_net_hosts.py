# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""The hosts block for real: atomic under concurrent readers and writers, resolvable inside a
network namespace through /etc/netns/<ns>/hosts (never the real /etc/hosts), and the
in-place fallback where the file is a bind mount (as in containers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from banger.net import hosts
from tests.integration.test_net_policy import HTTP, Lab, _curl_eventually, lab  # noqa: F401
from tests.support.guestnet import _wait_line
from tests.support.netns import netns, py_argv, result, spawn_in_ns  # noqa: F401

READER = r"""
import sys, time
path, deadline = sys.argv[1], time.time() + float(sys.argv[2])
valid = [open(p, "rb").read() for p in sys.argv[3:]]
reads = bad = 0
while time.time() < deadline:
    data = open(path, "rb").read()
    reads += 1
    if data not in valid:
        bad += 1
print(reads, bad)
"""


def _config(home: Path, **kv) -> None:
    (home / "config.toml").write_text("".join(f'{k} = "{v}"\n' for k, v in kv.items()))


def test_readers_never_see_a_torn_hosts_file_while_writers_race(banger_env, tmp_path):
    big = b"".join(b"# filler line %06d of a large hosts file that is not banger's\n" % i for i in range(20000))
    path = tmp_path / "hosts"
    path.write_bytes(big)
    _config(banger_env["home"], hosts_file=str(path))
    lists = [[(f"vm{j}-{i}", f"172.30.0.{i + 2}") for i in range(j + 1)] for j in range(4)]
    states = []
    for j, pairs in enumerate(lists + [[]]):
        p = tmp_path / f"valid{j}"
        p.write_bytes(hosts.merge(big, hosts.render(pairs, "banger")))
        states.append(str(p))
    reader = subprocess.Popen(py_argv(READER, path, 8, *states), stdout=subprocess.PIPE, text=True)
    writer = textwrap.dedent(f"""
        import sys
        from banger.context import Ctx
        from banger.net import hosts
        lists = {lists!r}
        ctx = Ctx()
        for k in range(40):
            hosts.sync(ctx, lists[(k + int(sys.argv[1])) % len(lists)] if k < 39 else [])
    """)
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(i)], env=banger_env["env"]) for i in range(4)]
    for w in writers:
        assert w.wait(timeout=300) == 0
    out, _ = reader.communicate(timeout=60)
    reads, bad = map(int, out.split())
    assert reads > 50 and bad == 0, (reads, bad)
    assert path.read_bytes() == big  # the last sync of every writer removed the block
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".banger-hosts.")]


def test_names_resolve_inside_a_netns_and_stop_resolving(lab):
    """hosts_file = /etc/netns/<ns>/hosts: what `ip netns exec` shows the namespace as /etc/hosts.
    getent and curl inside the namespace find the VM by <name>.<domain>, through a published port."""
    ns = lab.ns
    d = Path("/etc/netns") / ns.name
    created_root = not d.parent.exists()
    d.mkdir(parents=True, exist_ok=True)  # the netns fixture makes it for the namespace's hosts file
    try:
        shutil.copyfile("/etc/hosts", d / "hosts")
        _config(ns.home, hosts_file=str(d / "hosts"), domain="vm.test")
        (a,) = lab.vms(1)
        g = lab.guest(a, net="isolated")
        p = lab.procs.add(spawn_in_ns(g.ns, py_argv(HTTP, a["ip"], 80, a["name"])))
        _wait_line(p, "ready")
        result(ns.call(f"publish.publish(ctx, {lab.row(a, 'isolated')!r}, '8080:80')"))
        r = result(ns.call(f"hosts.sync(ctx, [({a['name']!r}, {a['ip']!r}), ('other', '172.30.0.99')])"))
        assert r["changed"] is True and r["atomic"] is True

        cp = ns.run(["getent", "hosts", f"{a['name']}.vm.test"])
        assert cp.returncode == 0 and cp.stdout.split() == [a["ip"], f"{a['name']}.vm.test"], cp
        cp = _curl_eventually(ns.name, f"http://{a['name']}.vm.test/")  # port 80 on the guest itself
        assert cp.returncode == 0 and "says hi" in cp.stdout, cp
        # the real /etc/hosts of the host was never touched
        assert "vm.test" not in Path("/etc/hosts").read_text()

        result(ns.call("hosts.sync(ctx, [('other', '172.30.0.99')])"))  # the VM was deleted
        assert ns.run(["getent", "hosts", f"{a['name']}.vm.test"]).returncode == 2
        assert ns.run(["getent", "hosts", "other.vm.test"]).returncode == 0
        result(ns.call("hosts.sync(ctx, [])"))
        assert (d / "hosts").read_bytes() == Path("/etc/hosts").read_bytes()
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if created_root:
            try:
                d.parent.rmdir()
            except OSError:
                pass


def test_a_bind_mounted_hosts_file_is_rewritten_in_place(banger_env, tmp_path):
    """Containers bind-mount /etc/hosts: rename over a mount point fails (EBUSY), so the file is
    rewritten in place and the result says it was not atomic. In a private mount namespace."""
    src, target = tmp_path / "src-hosts", tmp_path / "hosts"
    src.write_bytes(b"127.0.0.1 localhost\n")
    target.write_bytes(b"")
    _config(banger_env["home"], hosts_file=str(target))
    code = textwrap.dedent(f"""
        import json, subprocess
        subprocess.run(["mount", "--bind", {str(src)!r}, {str(target)!r}], check=True)
        from banger.context import Ctx
        from banger.net import hosts
        r = hosts.sync(Ctx(), [("web", "172.30.0.3")])
        print(json.dumps({{"r": r, "data": open({str(target)!r}).read()}}))
    """)
    cp = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", code],
                        env=banger_env["env"], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout.strip().splitlines()[-1])
    assert doc["r"]["atomic"] is False and doc["r"]["changed"] is True
    assert doc["data"] == "127.0.0.1 localhost\n" + hosts.render([("web", "172.30.0.3")], "banger").decode()
    assert src.read_text() == doc["data"]  # the mounted file itself was updated
    assert target.read_bytes() == b""  # outside the private namespace nothing changed
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".banger-hosts.")]
