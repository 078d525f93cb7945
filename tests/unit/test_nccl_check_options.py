"""nccl-check's pure parts (the GPU tier, tests/gpu, runs the whole command against Consul and NCCL)."""
from __future__ import annotations

import pytest

from sglang_fleet import cli, nccl_allreduce, nccl_check
from sglang_fleet.config import EX_CONFIG, load_config

BASE_ENV = {"FLEET_MODEL_PATH": "m", "FLEET_NODE_NAME": "gpu-a", "FLEET_GROUP": "llama-a", "FLEET_NNODES": "2",
            "FLEET_TP_SIZE": "16"}


@pytest.mark.parametrize("text,value", [("8", 8), ("64K", 65536), ("256M", 256 << 20), ("1G", 1 << 30),
                                        ("256MiB", 256 << 20), ("1.5k", 1536)])
def test_parse_bytes(text, value):
    assert nccl_check.parse_bytes(text) == value


def test_sizes_double_from_min_to_max():
    sizes = nccl_allreduce.sizes(8, 256 << 20)
    assert sizes[0] == 8 and sizes[-1] == 256 << 20 and len(sizes) == 26


def test_check_group_is_separate_from_the_serving_group():
    cfg = nccl_check.check_config(load_config(BASE_ENV), dist_port=None)
    assert cfg.group == "llama-a-nccl-check" and cfg.dist_port == 20000 and cfg.gpus_per_node == 8
    assert nccl_check.check_config(load_config(BASE_ENV), dist_port=29555).dist_port == 29555


def test_too_long_group_name_is_one_clear_error():
    cfg = load_config({**BASE_ENV, "FLEET_GROUP": "g" * 60})
    with pytest.raises(nccl_check.CheckFailed, match="FLEET_GROUP='g+'.*shorter group name"):
        nccl_check.check_config(cfg, dist_port=None)


@pytest.mark.parametrize("flags", [["--max-bytes", "12Q"], ["--min-bytes", "1M", "--max-bytes", "1K"]])
def test_bad_byte_range_exits_78(monkeypatch, capsys, flags):
    for k, v in BASE_ENV.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["nccl-check", *flags]) == EX_CONFIG
    assert "configuration error: --min-bytes=" in capsys.readouterr().err
