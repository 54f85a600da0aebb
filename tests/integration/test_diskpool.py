"""Claiming ready-made disk sets across real processes: each set goes to exactly one claimer."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

from banger.config import load_config
from banger.context import Ctx


def _cfg(tmp_path):
    return load_config({"BANGER_HOME": str(tmp_path / "home"), "BANGER_RUN": str(tmp_path / "run")})


def _fake_sets(cfg, key, n):
    from banger.vms import diskpool

    for i in range(n):
        d = diskpool.pool_dir(cfg) / f"{key}-{i:08x}"
        d.mkdir(parents=True)
        (d / "work.ext4").write_text(f"work {i}")
        (d / "overlay.ext4").write_text(f"overlay {i}")
        (d / "host_key.pub").write_text(f"ssh-ed25519 KEY{i}")


def _claimer(home, run, vm_id, go, out):
    from banger.vms import diskpool

    cfg = load_config({"BANGER_HOME": home, "BANGER_RUN": run})
    ctx = Ctx(cfg)
    vm = {"id": vm_id, "ip": "172.30.0.9"}
    cfg.vm_dir(vm_id).mkdir(parents=True)
    go.wait()
    got = diskpool.claim(ctx, vm, "k1")
    work = (cfg.vm_dir(vm_id) / "work.ext4").read_text() if got else None
    out.put(json.dumps({"vm": vm_id, "got": got, "work": work}))


def test_eight_claimers_four_sets_each_set_once(tmp_path):
    cfg = _cfg(tmp_path)
    _fake_sets(cfg, "k1", 4)
    _fake_sets(cfg, "k2", 1)  # another key is never taken
    go, out = mp.Event(), mp.Queue()
    ps = [mp.Process(target=_claimer, args=(str(cfg.home), str(cfg.run), f"vm{i}", go, out)) for i in range(8)]
    for p in ps:
        p.start()
    go.set()
    res = [json.loads(out.get(timeout=60)) for _ in ps]
    for p in ps:
        p.join(30)
    won = [r for r in res if r["got"]]
    assert len(won) == 4 and sorted(r["work"] for r in won) == [f"work {i}" for i in range(4)]
    from banger.vms import diskpool

    assert diskpool.ready(cfg, "k1") == [] and len(diskpool.ready(cfg, "k2")) == 1
    for r in won:  # the claimed key is pinned for the VM's address
        kh = (cfg.vm_dir(r["vm"]) / "known_hosts").read_text()
        assert kh.startswith("172.30.0.9 ssh-ed25519 KEY") and not (cfg.vm_dir(r["vm"]) / ".diskset").exists()
    assert not any(os.listdir(cfg.vm_dir(r["vm"])) for r in res if not r["got"])


def test_key_changes_with_the_seed_and_sizes(tmp_path):
    from banger.vms import diskpool

    seed = tmp_path / "seed.ext4"
    seed.write_bytes(b"x" * 10)
    img = {"name": "img", "work_seed": str(seed), "key_fingerprint": "SHA256:a"}
    k = diskpool.key(img, work_size_mib=2048, overlay_size_mib=4096, use_seed=True)
    assert k == diskpool.key(dict(img), work_size_mib=2048, overlay_size_mib=4096, use_seed=True)
    assert k != diskpool.key(img, work_size_mib=4096, overlay_size_mib=4096, use_seed=True)
    assert k != diskpool.key(img, work_size_mib=2048, overlay_size_mib=4096, use_seed=False)
    assert k != diskpool.key({**img, "key_fingerprint": "SHA256:b"}, work_size_mib=2048, overlay_size_mib=4096,
                             use_seed=True)
    new = tmp_path / "seed2"
    new.write_bytes(b"y" * 10)
    os.replace(new, seed)  # a refreshed seed is a new file
    assert k != diskpool.key(img, work_size_mib=2048, overlay_size_mib=4096, use_seed=True)
