# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""kill -9 in the middle of a kernel pull (download, and `dpkg-deb -x` of a kernel package) and of an
image pull, then `banger gc`: nothing is left (staging dirs, partial blobs, worker processes still
writing) and the same command run again succeeds. Real processes, a real HTTP server and a real
registry on loopback."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.cli import banger_json
from tests.support.images import assert_nothing_left
from tests.support.kernels import KernelServer, fake_bzimage, fake_elf_kernel, sha256, write_catalog
from tests.support.netns import netns  # noqa: F401  (fixture: gc's TAP and NAT scans stay out of the host's)
from tests.support.registry import layer, registry  # noqa: F401  (fixture)

ELF = fake_elf_kernel(release="9.9.7-gc", size=3 << 20, seed=77)
BZ = fake_bzimage(ELF, "gzip", version="9.9.7-gc (t@b) #1")


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "banger.cli.main", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _wait(pred, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _kill9(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)


def _procs_naming(root: Path) -> list[str]:
    """Processes whose command line names ``root`` (an independent check, not banger's)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            st = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(root) in argv and st not in "ZX":
            out.append(f"{d}: {argv[:160]}")
    return out


def _staging(cfg, prefix: str) -> list[Path]:
    return sorted(cfg.staging_dir.glob(f"{prefix}*")) if cfg.staging_dir.exists() else []


def test_kill_9_during_kernel_download_then_gc(cfg, tmp_path, monkeypatch, netns):
    with KernelServer({"/k/bzImage": BZ}, bytes_per_s=512 << 10) as srv:  # a few seconds
        monkeypatch.setenv("BANGER_KERNEL_CATALOG", str(write_catalog(tmp_path / "kernels.json", [
            {"name": "kgc", "source": {"type": "url", "url": srv.url("/k/bzImage"), "sha256": sha256(BZ)}}])))
        p = _spawn("kernel", "pull", "kgc")
        part = _wait(lambda: next((d / "download" for d in _staging(cfg, "kernel-kgc-")
                                   if (d / "download").exists() and (d / "download").stat().st_size > 0), None),
                     120, "the download to start")
        _kill9(p)
        srv.bytes_per_s = None  # let the server finish the abandoned response
        assert part.exists()  # the killed pull left its staging dir behind
        rep = netns.banger_json("gc")["data"]
        assert not rep["errors"] and [Path(s) for s in rep["staging"]] == [part.parent], rep
        assert _staging(cfg, "") == []
        d = banger_json("kernel", "pull", "kgc")["data"]
        assert d["downloaded"] and d["version"] == "9.9.7-gc"
        assert netns.banger_json("gc", "--dry-run")["data"]["total"] == 0


def _kernel_deb(tmp_path: Path, filler_mib: int) -> bytes:
    """A kernel image package: /boot/vmlinuz-<release> and a large incompressible filler (so that
    `dpkg-deb -x`, its decompressor and its tar run for a while)."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: linux-image-gc-test\nVersion: 1\nArchitecture: amd64\n"
                                            "Maintainer: t <t@example.com>\nDescription: test\n")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-9.9.7-gc").write_bytes(BZ)
    (root / "usr" / "share" / "filler").mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(root / "usr" / "share" / "filler" / "data", "wb") as f:
        for i in range(filler_mib):
            f.write(block[i % 7:] + block[:i % 7])
    out = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def test_kill_9_during_deb_unpack_kills_its_workers_then_gc(cfg, tmp_path, monkeypatch, netns):
    deb = _kernel_deb(tmp_path, 160)
    with KernelServer({"/k.deb": deb}) as srv:
        monkeypatch.setenv("BANGER_KERNEL_CATALOG", str(write_catalog(tmp_path / "kernels.json", [
            {"name": "kdeb", "source": {"type": "url", "url": srv.url("/k.deb"), "sha256": sha256(deb)}}])))
        p = _spawn("kernel", "pull", "kdeb")
        filler = _wait(lambda: next((f for d in _staging(cfg, "kernel-kdeb-")
                                     for f in [d / "deb" / "usr" / "share" / "filler" / "data"]
                                     if f.exists() and f.stat().st_size > 0), None), 120, "dpkg-deb to start writing")
        stage = filler.parents[4]
        assert _procs_naming(stage), "expected dpkg-deb's workers to be running"
        _kill9(p)
        # dpkg-deb, its decompressor and its tar die with the pull: nothing keeps writing into the staging dir
        _wait(lambda: not _procs_naming(stage), 30, "dpkg-deb's workers to die with their parent", 0.05)
        size = filler.stat().st_size
        assert size < 160 << 20
        rep = netns.banger_json("gc")["data"]
        assert not rep["errors"] and [Path(s) for s in rep["staging"]] == [stage], rep
        assert _staging(cfg, "") == []
        d = banger_json("kernel", "pull", "kdeb")["data"]
        assert d["downloaded"] and d["version"] == "9.9.7-gc"
        assert _staging(cfg, "") == []


class _Trickle:
    """A loopback front to a registry that sends blob bodies slowly (headers at once)."""

    def __init__(self, upstream: str, bytes_per_s: float):
        self.upstream = urlsplit(upstream).netloc
        self.bytes_per_s = bytes_per_s
        front = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                conn = http.client.HTTPConnection(front.upstream, timeout=60)
                conn.request("GET", self.path, headers={k: v for k, v in self.headers.items()
                                                        if k.lower() in ("accept", "authorization")})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "docker-content-digest", "www-authenticate"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                slow = "/blobs/" in self.path and len(data) > 100_000
                step = 16 << 10
                try:
                    for off in range(0, len(data), step):
                        self.wfile.write(data[off:off + step])
                        if slow:
                            time.sleep(step / front.bytes_per_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


BASE = [("dir", "bin", 0o755, 0, 0), ("file", "bin/sh", b"#!fake shell\n", 0o755, 0, 0),
        ("dir", "etc", 0o755, 0, 0), ("file", "etc/os-release", b"ID=testos\n"),
        ("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), ("dir", "root", 0o700, 0, 0)]


@pytest.mark.parametrize("kill_in", ["blob", "build"])
def test_kill_9_during_image_pull_then_gc(banger_env, cfg, registry, kill_in, netns):
    big = layer(BASE + [("file", "srv/big", os.urandom(6 << 20))], "gzip")
    registry.push_image("test/gcpull", "v1", [big])
    blobs = cfg.cache_dir / "blobs" / "sha256"
    with _Trickle(registry.url, bytes_per_s=(6 << 20) / 20) as front:
        if kill_in == "blob":  # mid-download: a .part in the blob cache, a staging dir
            p = _spawn("image", "pull", f"{front.host}/test/gcpull:v1", "--name", "gcpull")
            _wait(lambda: blobs.exists() and any(f.name.endswith(".part") and f.stat().st_size > 0
                                                 for f in blobs.iterdir()), 120, "a partial blob")
        else:  # blobs in the cache, the rootfs being built in the staging dir
            p = _spawn("image", "pull", f"{registry.host}/test/gcpull:v1", "--name", "gcpull")
            _wait(lambda: any((d / "tree" / "srv").exists() for d in _staging(cfg, "image-gcpull-")), 120,
                  "the layers to be applied")
        _kill9(p)
    left = _staging(cfg, "image-gcpull-")
    parts = [f for f in blobs.iterdir() if f.name.startswith(".")] if blobs.exists() else []
    assert left and (parts or kill_in == "build")
    rep = netns.banger_json("gc")["data"]
    assert not rep["errors"], rep
    assert sorted(Path(s) for s in rep["staging"]) == left
    assert sorted(Path(b) for b in rep["blobs"]) == sorted(parts)
    assert_nothing_left(cfg, "gcpull")
    d = banger_json("image", "pull", f"{registry.host}/test/gcpull:v1", "--name", "gcpull")["data"]
    assert d["name"] == "gcpull" and Path(d["rootfs"]).is_file()
    assert netns.banger_json("gc", "--dry-run")["data"]["total"] == 0


@pytest.mark.slow
def test_kill_9_during_image_build_then_gc(cfg, netns):
    """debootstrap (slow: it runs twice, about a minute each) killed with its banger: its whole tree
    dies at once (it runs in a PID namespace whose init dies with banger), gc removes the half-built
    tree, and the same build then succeeds. The build runs in a private mount namespace of its own
    here, so whatever debootstrap mounts in the target never reaches the host's."""
    from tests.support.images import CACHE

    shared = CACHE / "debootstrap-cache"  # debootstrap's package cache, shared with the default image
    shared.mkdir(parents=True, exist_ok=True)
    (cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    os.symlink(shared, cfg.cache_dir / "debootstrap")
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "banger.cli.main",
            "image", "build", "gcbuild", "--json"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    tree = _wait(lambda: next((d / "tree" for d in _staging(cfg, "image-gcbuild-")
                               if (d / "tree" / "usr" / "bin").is_dir()), None), 900, "debootstrap to unpack", 0.05)
    stage = tree.parent
    assert _procs_naming(stage), "expected debootstrap to be running"
    _kill9(p)
    _wait(lambda: not _procs_naming(stage), 30, "debootstrap's tree to die with banger", 0.05)
    rep = netns.banger_json("gc")["data"]
    assert not rep["errors"] and [Path(s) for s in rep["staging"]] == [stage], rep
    assert _staging(cfg, "") == []
    d = banger_json("image", "build", "gcbuild", timeout=1800)["data"]
    assert d["name"] == "gcbuild" and Path(d["rootfs"]).is_file()
    assert _staging(cfg, "") == []
    banger_json("image", "delete", "gcbuild")
