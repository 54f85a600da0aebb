"""The embedded kernel catalog and its override."""

from __future__ import annotations

import json

import pytest

from banger.config import DEFAULTS
from banger.errors import UsageError
from banger.kernels import catalog as kernels
from tests.support.kernels import write_catalog


def test_embedded_catalog_has_the_default_kernel_from_apt(monkeypatch):
    monkeypatch.delenv(kernels.CATALOG_ENV, raising=False)
    cat = kernels.catalog()
    entry = cat[DEFAULTS["default_kernel"]]
    assert entry["source"] == {"type": "apt", "package": "linux-image-cloud-amd64"}


def test_embedded_url_entries_never_carry_an_unverified_digest(monkeypatch):
    monkeypatch.delenv(kernels.CATALOG_ENV, raising=False)
    urls = [e for e in kernels.catalog().values() if e["source"]["type"] == "url"]
    assert urls, "the catalog should show the URL source kind"
    for e in urls:
        sha = e["source"].get("sha256")
        # either a real pinned digest or none at all, with the reason written down
        assert sha is None and "comment" in e or (isinstance(sha, str) and len(sha) == 64)


def test_catalog_override(tmp_path, monkeypatch):
    p = write_catalog(tmp_path / "cat.json", [{"name": "k1", "source": {"type": "url", "url": "http://x/k",
                                                                       "sha256": "0" * 64}}])
    monkeypatch.setenv(kernels.CATALOG_ENV, str(p))
    assert list(kernels.catalog()) == ["k1"]


def test_bad_catalog_is_a_usage_error(tmp_path, monkeypatch):
    p = tmp_path / "cat.json"
    p.write_text(json.dumps({"kernels": [{"name": "x", "source": {"type": "ftp"}}]}))
    monkeypatch.setenv(kernels.CATALOG_ENV, str(p))
    with pytest.raises(UsageError, match="apt or url"):
        kernels.catalog()
    p.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read the kernel catalog"):
        kernels.catalog()
