"""Pure checks: reference parsing, auth challenge parsing, entry-name safety, apt sources, init's line parser."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.errors import HostError, UsageError
from banger.images.service import validate_name
from banger.images.sources.debootstrap import host_mirror
from banger.images.sources.oci.layers import UnsafeLayer, normalise
from banger.images.sources.oci.pull import default_name
from banger.images.sources.oci.registry import DOCKER_HUB, _parse_challenge, parse_ref

INIT = Path(__file__).resolve().parents[2] / "banger" / "data" / "guest" / "banger-init"


@pytest.mark.parametrize("ref,registry,repo,tag,digest", [
    ("debian", DOCKER_HUB, "library/debian", "latest", None),
    ("debian:bookworm-slim", DOCKER_HUB, "library/debian", "bookworm-slim", None),
    ("docker.io/library/debian:12", "docker.io", "library/debian", "12", None),
    ("user/app", DOCKER_HUB, "user/app", "latest", None),
    ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a/b", "v1", None),
    ("localhost/x", "localhost", "x", "latest", None),
    ("ghcr.io/o/r@sha256:" + "a" * 64, "ghcr.io", "o/r", None, "sha256:" + "a" * 64),
])
def test_parse_ref(ref, registry, repo, tag, digest):
    r = parse_ref(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a:b:c", "x@sha256:short", "a/../b", " debian", "a:" + "t" * 200])
def test_parse_ref_rejects(bad):
    with pytest.raises(UsageError):
        parse_ref(bad)


def test_default_name_and_validation():
    assert default_name(parse_ref("127.0.0.1:5000/tools/alpine:3.19")) == "alpine-3.19".replace(".", "-")
    assert default_name(parse_ref("debian")) == "debian"
    for good in ("debian-bookworm", "a", "x.y_z-1"):
        assert validate_name(good) == good
    for bad in ("", "A", "-x", "a..b", "a/b", "x" * 64, "a."):
        with pytest.raises(UsageError):
            validate_name(bad)


def test_parse_challenge():
    scheme, p = _parse_challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert scheme == "bearer"
    assert p == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull"}


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../b", "a/b/..", "x\x00y"])
def test_normalise_refuses(name):
    with pytest.raises(UnsafeLayer):
        normalise(name, "L")


def test_normalise_ok():
    assert normalise("./usr//bin/./sh") == ("usr", "bin", "sh")
    assert normalise("./") == ()


def test_host_mirror_deb822_and_one_line(tmp_path):
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    (d / "other.sources").write_text("Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
                                     "Components: main\n")
    (d / "debian.sources").write_text(
        "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    assert host_mirror("bookworm", tmp_path) == ("http://mirror.example/debian",
                                                 "/usr/share/keyrings/debian-archive-keyring.gpg")
    (d / "debian.sources").unlink()
    (tmp_path / "etc/apt/sources.list").write_text(
        "# deb http://commented/ bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n")
    assert host_mirror("bookworm", tmp_path) == ("http://one.example/debian", "/k.gpg")
    with pytest.raises(HostError):
        host_mirror("trixie", tmp_path)


def _check_net(line: str) -> tuple[int, str]:
    cp = subprocess.run(["dash", str(INIT), "--check-net", line], capture_output=True, text=True, timeout=10)
    return cp.returncode, cp.stdout.strip()


@pytest.mark.parametrize("line,expect", [
    ("@banger net 172.30.0.5/24 172.30.0.1 02:aa:bb:cc:dd:ee vm-1", "ok 172.30.0.5/24 172.30.0.1 02:aa:bb:cc:dd:ee vm-1"),
    ("@banger net 10.0.0.2/8 10.0.0.1 06:00:00:00:00:01 a\r", "ok 10.0.0.2/8 10.0.0.1 06:00:00:00:00:01 a"),
])
def test_init_accepts_valid_net_line(line, expect):
    assert _check_net(line) == (0, expect)


@pytest.mark.parametrize("line", [
    "@banger net 256.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee h",     # octet > 255
    "@banger net 10.0.0.1/33 10.0.0.1 02:aa:bb:cc:dd:ee h",      # prefix > 32
    "@banger net 10.0.0.1/0 10.0.0.1 02:aa:bb:cc:dd:ee h",       # prefix 0
    "@banger net 10.0.0.1 10.0.0.1 02:aa:bb:cc:dd:ee h",         # no prefix
    "@banger net 010.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee h",     # leading zero
    "@banger net 10.0.0.1/24 10.0.0 02:aa:bb:cc:dd:ee h",        # short gateway
    "@banger net 10.0.0.1/24 10.0.0.1 03:aa:bb:cc:dd:ee h",      # multicast MAC
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd h",         # short MAC
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee h;reboot",
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee $(reboot)",
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee -h",
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee " + "h" * 64,
    "@banger net 10.0.0.1/24 10.0.0.1 02:aa:bb:cc:dd:ee h extra",
    "@banger net * 10.0.0.1 02:aa:bb:cc:dd:ee h",
    "@banger reboot",
    "hello",
])
def test_init_refuses_invalid_net_line(line):
    assert _check_net(line) == (1, "invalid")
