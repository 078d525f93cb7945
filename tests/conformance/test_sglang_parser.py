"""Every argv sglang-fleet produces parses in SGLang 0.5.23, as launch_server parses it, with the
values it was meant to have and without deprecated or prefix-matched flags."""
from __future__ import annotations

import pytest

from conformance_cases import ADVERTISE_ADDR, DIST_INIT_ADDR, all_cases

CASE_IDS = [c.id for c in all_cases()]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_parses_without_complaint(parsed, case_id):
    cfg, argv, result = parsed[case_id]
    assert result["ok"], f"SGLang rejected {argv}: {result.get('error')}\n" + "\n".join(result["said"])
    assert result["said"] == [], f"SGLang said something while parsing {argv}:\n" + "\n".join(result["said"])
    assert result["deprecated_flags"] == []
    assert result["inexact_flags"] == [], "prefix-matched or unknown flags"
    assert result["invariants"] == []


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_sglang_resolution_hooks_accept_it(parsed, case_id):
    """SGLang's own model- and GPU-independent resolution hooks (sglang_parse.HOOKS) accept the argv."""
    _, argv, result = parsed[case_id]
    assert result["ok"]
    assert result["hooks_skipped"] == [], "a hook could not be imported in the parser venv"
    assert result["hook_failures"] == [], f"SGLang's resolution rejected {argv}"
    assert not [m for m in result["hooks_said"] if "deprecat" in m.lower()]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_values_round_trip(parsed, case_id):
    cfg, argv, result = parsed[case_id]
    assert result["ok"]
    got = result["values"]
    rank = int(case_id.rsplit("-rank", 1)[1])
    assert got["model_path"] == cfg.model_path
    assert got["tp_size"] == cfg.tp_size
    assert got["nnodes"] == cfg.nnodes
    assert got["node_rank"] == rank
    assert got["dist_init_addr"] == DIST_INIT_ADDR
    assert got["host"] == "0.0.0.0"
    assert got["port"] == cfg.http_port
    assert got["pp_size"] == (cfg.pp_size or 1)
    extra = dict(cfg.sglang_args)
    if "ep" in extra:
        assert got["ep_size"] == int(extra["ep"])
    else:
        assert got["ep_size"] == (cfg.ep_size or 1)
    if cfg.attn_dp or "enable-dp-attention" in extra:
        assert (got["attn_dp_size"], got["dp_size"]) == (cfg.dp_size, 1)
    elif "dp" in extra:
        assert got["dp_size"] == int(extra["dp"])
    else:
        assert (got["attn_dp_size"], got["dp_size"]) == (1, cfg.dp_size or 1)
    assert got["enable_dp_lm_head"] == cfg.dp_lm_head
    assert got["moe_a2a_backend"] == (cfg.moe_a2a_backend or "none")
    assert got["ep_num_redundant_experts"] == (cfg.ep_redundant_experts or 0)
    if cfg.role in ("prefill", "decode"):
        assert got["disaggregation_mode"] == cfg.role
    else:
        assert got["disaggregation_mode"] == "null"
    if cfg.role == "prefill":
        assert got["disaggregation_bootstrap_port"] == cfg.bootstrap_port
    if "cuda-graph-max-bs" in extra or "cuda-graph-max-bs-decode" in extra:
        assert got["cuda_graph_max_bs_decode"] == int(extra.get("cuda-graph-max-bs-decode")
                                                      or extra["cuda-graph-max-bs"])


def test_guide_prefill_values(parsed):
    """The guide's DeepSeek-R1 prefill node 1, as SGLang reads sglang-fleet's argv for it."""
    _, _, result = parsed["preset-deepseek-r1-prefill-rank1"]
    got = result["values"]
    assert got["chunked_prefill_size"] == 524288
    assert got["max_prefill_tokens"] == 32768
    assert got["disable_radix_cache"] is True
    assert got["disaggregation_ib_device"] == "mlx5_bond_0,mlx5_bond_1,mlx5_bond_2,mlx5_bond_3"
    assert (got["tp_size"], got["attn_dp_size"], got["node_rank"]) == (16, 16, 1)


def test_guide_decode_and_slurm_values(parsed):
    decode = parsed["preset-deepseek-r1-decode-rank0"][2]["values"]
    assert (decode["cuda_graph_max_bs_decode"], decode["max_running_requests"], decode["port"]) == (64, 2048, 30001)
    slurm = parsed["preset-llama-405b-slurm-xgrammar-rank1"][2]["values"]
    assert slurm["grammar_backend"] == "xgrammar"


def test_advertise_addr_is_not_in_argv(parsed):
    for _, argv, _ in parsed.values():
        assert ADVERTISE_ADDR not in argv
