import pytest

from banger.errors import InvalidName
from banger.names import Subnet, generate_name, validate_name


@pytest.mark.parametrize("name", ["a", "dev-1", "x" * 63, "0abc", "web01"])
def test_valid_labels(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "a_b", "a.b", "x" * 64, "a b", "Dev", "a/b", "../x", "é"])
def test_invalid_labels(name):
    with pytest.raises(InvalidName) as ei:
        validate_name(name)
    assert ei.value.hint


def test_uppercase_hint_suggests_lowercase():
    with pytest.raises(InvalidName) as ei:
        validate_name("MyVM")
    assert "'myvm'" in ei.value.hint


def test_generated_names_are_valid():
    for _ in range(200):
        validate_name(generate_name())


def test_subnet_derivation():
    s = Subnet("172.30.0.0/24")
    assert s.gateway == "172.30.0.1"
    assert s.ip(2) == "172.30.0.2" and s.ip(254) == "172.30.0.254"
    assert s.mac(5) == "06:00:ac:1e:00:05"
    with pytest.raises(ValueError):
        s.ip(255)
    with pytest.raises(ValueError):
        s.ip(1)
