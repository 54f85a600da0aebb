"""Who uses an image or a kernel: VMs and snapshots. `image delete` checks before it touches any file,
so a refused delete never hides the image from a VM starting meanwhile; a snapshot keeps its image
and kernel (every later restore needs them)."""

from __future__ import annotations

import json
import time

from banger.state.store import Store
from tests.support.cli import banger_json
from tests.support.procs import spawn_py

WATCH = """
import os, sys, time
path, stop, ready = sys.argv[1], sys.argv[2], sys.argv[3]
checks = misses = 0
while not os.path.exists(stop):
    checks += 1
    if not os.path.exists(path):
        misses += 1
    if checks == 1:
        open(ready, "w").close()  # the test starts deleting only once this watcher is checking
print(checks, misses)
"""


def _rows(cfg, *, vm_image: str | None = None, snapshot: dict | None = None) -> None:
    now = time.time()
    with Store(cfg.db_path) as s, s.immediate() as c:
        c.execute("INSERT INTO kernels (name, dir, created_at) VALUES ('k1', '/nonexistent', ?)", (now,))
        c.execute("INSERT INTO images (name, kind, rootfs, kernel, created_at) VALUES ('img1', 'test', ?, 'k1', ?)",
                  (str(cfg.images_dir / "img1" / "rootfs.ext4"), now))
        if vm_image:
            c.execute("INSERT INTO vms (id, name, state, image, kernel, vcpu, memory_mib, overlay_size_mib, "
                      "work_disk_size_mib, slot, ip, mac, created_at, updated_at) VALUES ('v1', 'vm1', 'stopped', ?,"
                      " 'k1', 1, 512, 64, 64, 2, '172.30.0.2', '06:00:ac:1e:00:02', ?, ?)", (vm_image, now, now))
        if snapshot:
            c.execute("INSERT INTO snapshots (name, vm_id, vm_name, backend, dir, meta, created_at) "
                      "VALUES ('snap1', 'gone', 'gone-vm', 'qemu', '/nonexistent', ?, ?)",
                      (json.dumps(snapshot), now))
    (cfg.images_dir / "img1").mkdir(parents=True)
    (cfg.images_dir / "img1" / "rootfs.ext4").write_bytes(b"\0" * 4096)


def test_refused_image_delete_never_hides_the_files(banger_env, cfg, tmp_path):
    from banger.context import Ctx
    from banger.errors import Conflict
    from banger.images import service as images

    _rows(cfg, vm_image="img1")
    rootfs = cfg.images_dir / "img1" / "rootfs.ext4"
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    watcher = spawn_py(WATCH, str(rootfs), str(stop), str(ready))
    deadline = time.monotonic() + 60
    while not ready.exists():  # (a delete refused in microseconds would otherwise beat its start)
        assert watcher.poll() is None and time.monotonic() < deadline, "the watcher did not start"
        time.sleep(0.01)
    ctx = Ctx()
    try:
        refused = 0
        for _ in range(200):
            try:
                images.delete(ctx, "img1")
            except Conflict:
                refused += 1
    finally:
        stop.touch()
        ctx.close()
    checks, misses = map(int, watcher.communicate(timeout=60)[0].split())
    assert refused == 200 and checks > 0
    assert misses == 0, f"the image's rootfs vanished {misses} times during refused deletes"
    doc = banger_json("image", "delete", "img1", check=False)
    assert doc["error"]["code"] == "conflict" and "VM vm1" in doc["error"]["message"]
    assert doc["error"]["details"] == {"vms": ["vm1"], "snapshots": []}


def test_snapshots_are_users_of_their_image_and_kernel(banger_env, cfg):
    _rows(cfg, snapshot={"image": "img1", "kernel": "k1"})
    doc = banger_json("image", "delete", "img1", check=False)
    assert doc["error"]["code"] == "conflict" and "snapshot snap1" in doc["error"]["message"], doc
    assert doc["error"]["details"] == {"vms": [], "snapshots": ["snap1"]}
    assert (cfg.images_dir / "img1" / "rootfs.ext4").exists()
    doc = banger_json("kernel", "rm", "k1", check=False)
    assert doc["error"]["code"] == "conflict" and "snapshot snap1" in doc["error"]["message"], doc
    assert doc["error"]["details"]["snapshots"] == ["snap1"]
    with Store(cfg.db_path) as s:
        s.execute("DELETE FROM snapshots WHERE name = 'snap1'")
    assert banger_json("image", "delete", "img1")["data"]["deleted"]
    assert not (cfg.images_dir / "img1").exists()
    assert banger_json("kernel", "rm", "k1")["data"]["removed"]
