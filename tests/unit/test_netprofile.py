"""Fabric detection on sysfs trees laid out under tests/unit/fixtures/sysfs, and the profiles."""
from __future__ import annotations

from pathlib import Path

import pytest

from sglang_fleet import netprofile

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"


@pytest.mark.parametrize("tree, profile, gid_index", [
    ("infiniband", "infiniband", None),
    ("roce", "roce", 3),              # first RoCE v2 GID with an IPv4-mapped address
    ("roce-linklocal", "roce", 1),    # only a link-local RoCE v2 GID
    ("roce-v1-only", "roce", None),   # no RoCE v2 GID: the profile's index stays
    ("mixed", "infiniband", None),
    ("ports-down", "ethernet", None),
    ("no-rdma", "ethernet", None),
    ("does-not-exist", "ethernet", None),
])
def test_detect(tree, profile, gid_index):
    found = netprofile.detect(SYSFS / tree)
    assert (found.profile, found.gid_index) == (profile, gid_index)
    assert found.reason


def test_detect_names_devices():
    assert netprofile.detect(SYSFS / "roce").devices == ("mlx5_bond_0", "mlx5_bond_1")
    assert "mlx5_0, mlx5_1" in netprofile.detect(SYSFS / "infiniband").reason


def test_auto_roce_uses_detected_gid_index():
    prof = netprofile.resolve("auto", SYSFS / "roce-linklocal")
    assert prof.name == "roce"
    assert prof.env["NCCL_IB_GID_INDEX"] == "1"
    assert prof.env["NCCL_IB_DISABLE"] == "0"
    assert prof.reason.startswith("auto:")


def test_auto_roce_v1_only_keeps_profile_gid_index():
    assert netprofile.resolve("auto", SYSFS / "roce-v1-only").env["NCCL_IB_GID_INDEX"] == "3"


def test_auto_without_rdma_is_ethernet_with_ib_disabled():
    prof = netprofile.resolve("auto", SYSFS / "no-rdma")
    assert prof.name == "ethernet"
    assert prof.env["NCCL_IB_DISABLE"] == "1"


@pytest.mark.parametrize("name", netprofile.PROFILES)
def test_profiles_carry_the_guides_variables(name):
    env = netprofile.resolve(name).env
    assert env["NCCL_IB_DISABLE"] == ("1" if name == "ethernet" else "0")
    assert env["NCCL_DEBUG"] == "INFO"
    if name != "ethernet":
        assert env["NCCL_IB_QPS_PER_CONNECTION"] == "8"
        assert env["NCCL_IB_SPLIT_DATA_ON_QPS"] == "1"
        assert env["NCCL_MIN_NCHANNELS"] == "4"
        assert env["NCCL_NET_PLUGIN"] == "none"
    if name == "roce":
        assert (env["NCCL_IB_GID_INDEX"], env["NCCL_IB_TC"], env["NCCL_IB_SL"]) == ("3", "136", "5")
    # The interface is added at launch from the advertise address, never written down here.
    assert "NCCL_SOCKET_IFNAME" not in env and "GLOO_SOCKET_IFNAME" not in env


def test_unknown_profile():
    with pytest.raises(netprofile.ProfileError, match="unknown NCCL profile 'myrinet'"):
        netprofile.resolve("myrinet")


def test_env_file_syntax(tmp_path):
    good = tmp_path / "good.env"
    good.write_text("# comment\n\nexport A=1\nB='x y'\nC=\"^=mlx5_0\"\n")
    assert netprofile.read_env_file(good) == {"A": "1", "B": "x y", "C": "^=mlx5_0"}
    bad = tmp_path / "bad.env"
    bad.write_text("A=1\nnot a line\n")
    with pytest.raises(netprofile.ProfileError, match="bad.env:2"):
        netprofile.read_env_file(bad)


def test_interface_for_loopback():
    assert netprofile.interface_for("127.0.0.1") == "lo"


def test_interface_for_foreign_address_is_none():
    assert netprofile.interface_for("192.0.2.77") is None  # TEST-NET-1: never local


def test_interface_for_ipv6_reads_proc():
    proc = FIXTURES / "proc"
    assert netprofile.interface_for("fd00::12", proc) == "eth0"
    assert netprofile.interface_for("::1", proc) == "lo"
    assert netprofile.interface_for("fd00::99", proc) is None
