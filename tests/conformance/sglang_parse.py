"""Runs INSIDE the SGLang parser venv ($FLEET_SGLANG_PYTHON), not under pytest.

stdin: JSON list of {"id": str, "argv": [engine flags, without the interpreter]}.
stdout: JSON list of results, one per case, in order.

Each argv goes through `sglang.srt.server_args.prepare_server_args`, the function
`python -m sglang.launch_server` calls on sys.argv[1:]: SGLang's own argparse parser (with its
prefix matching, choices and deprecated-flag actions) and `ServerArgs.from_cli_args`. Everything it
says while parsing is captured: Python warnings, log records of the `sglang` loggers (deprecated
flags are reported through `logger.warning`), and anything written to stdout/stderr.

Not run as a whole: `ServerArgs.resolve_once()`, which `launch_server.run_server` calls next. Its
resolution pipeline (`sglang.srt.arg_groups.pipeline`) imports SGLang's model-config stack
(transformers, safetensors, torchvision: not part of the parser install) and reads the model's
config.json from --model-path (a Hugging Face id here; no model hub is reachable, and the network
rule forbids trying); several of its hooks also probe the CUDA platform. Instead:
- SGLang's own hooks from that pipeline that need neither the model nor a GPU (`HOOKS`, in pipeline
  order) run on the parsed record, set up the way `run_resolution_pipeline` sets it up;
- the model-independent invariants of the skipped hooks that sglang-fleet's flags drive are checked
  on the parsed record (`invariants`; each names the SGLang function it mirrors).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import warnings

ROUND_TRIP_FIELDS = (
    "model_path", "tp_size", "ep_size", "dp_size", "attn_dp_size", "pp_size", "nnodes", "node_rank",
    "dist_init_addr", "host", "port", "disaggregation_mode", "disaggregation_bootstrap_port",
    "disaggregation_ib_device", "enable_dp_lm_head", "moe_a2a_backend", "ep_num_redundant_experts",
    "chunked_prefill_size", "max_prefill_tokens", "disable_radix_cache", "max_running_requests",
    "cuda_graph_max_bs_decode", "grammar_backend",
)


# (module under sglang.srt.arg_groups, function), in the order run_resolution_pipeline calls them.
HOOKS = (
    ("validation_hook", "validate_prefill_decode_interval"),
    ("validation_hook", "validate_response_store"),
    ("validation_hook", "validate_sampling_mask_max_tokens"),
    ("serving_hook", "handle_ssl_validation"),
    ("pd_disaggregation_hook", "handle_pd_disaggregation"),
    ("serving_hook", "handle_grammar_backend"),
    ("serving_hook", "handle_other_validations"),
)


def run_hooks(sa) -> tuple[list[str], list[str]]:
    """Runs HOOKS on a parsed record; returns (failures, hooks skipped because an import is missing)."""
    import importlib

    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.arg_groups.resolution_hooks import run_hook

    # The preamble of run_resolution_pipeline / resolve_once.
    sa._raw_input = {f.name: getattr(sa, f.name) for f in record_fields(type(sa))}
    sa._resolved_overrides = list(getattr(sa, "_resolved_overrides", ()))
    sa._input_frozen = True
    failures, skipped = [], []
    for module, name in HOOKS:
        try:
            hook = getattr(importlib.import_module(f"sglang.srt.arg_groups.{module}"), name)
            run_hook(hook, sa)
        except ModuleNotFoundError as e:
            skipped.append(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - SGLang rejects with ValueError or AssertionError
            failures.append(f"{name}: {type(e).__name__}: {e}")
    sa._input_frozen = False
    return failures, skipped


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def invariants(sa) -> list[str]:
    """Model-independent checks of SGLang's resolution pipeline (skipped there: see module doc)."""
    bad = []
    if sa.attn_dp_size < 1 or sa.tp_size % sa.attn_dp_size:  # parallel_hook.handle_data_parallelism
        bad.append(f"tp_size {sa.tp_size} % attn_dp_size {sa.attn_dp_size} != 0")
    if sa.attn_dp_size > 1 and sa.dp_size > 1:  # parallel_hook.handle_data_parallelism
        bad.append(f"dp_size {sa.dp_size} combined with attn_dp_size {sa.attn_dp_size}")
    if sa.enable_dp_lm_head and sa.attn_dp_size <= 1:  # overrides._dp_lm_head_validation
        bad.append("--enable-dp-lm-head without attention DP")
    if sa.tp_size % max(1, sa.ep_size):  # moe EP groups partition the TP group
        bad.append(f"tp_size {sa.tp_size} % ep_size {sa.ep_size} != 0")
    world = sa.tp_size * sa.pp_size * sa.dp_size  # server_args.compute_world_size
    if world % sa.nnodes:
        bad.append(f"world size {world} not divisible by nnodes {sa.nnodes}")
    if not 0 <= sa.node_rank < sa.nnodes:
        bad.append(f"node_rank {sa.node_rank} outside 0..{sa.nnodes - 1}")
    if sa.nnodes > 1 and not sa.dist_init_addr:
        bad.append("nnodes > 1 without --dist-init-addr")
    return bad


def main() -> int:
    cases = json.load(sys.stdin)
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    exact = set(parser._option_string_actions)
    deprecated = {opt for opt, act in parser._option_string_actions.items()
                  if type(act).__name__.startswith("Deprecated")}

    records = _Records()
    logging.getLogger("sglang").addHandler(records)  # basicConfig(force=True) only resets the root
    results = []
    for case in cases:
        argv = case["argv"]
        records.messages = []
        out, err = io.StringIO(), io.StringIO()
        result = {"id": case["id"], "ok": False}
        flags = [tok.split("=", 1)[0] for tok in argv if tok.startswith("--")]
        result["inexact_flags"] = [f for f in flags if f not in exact]
        result["deprecated_flags"] = [f for f in flags if f in deprecated]
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                sa = prepare_server_args(list(argv))
                result["ok"] = True
            except SystemExit as e:  # argparse error: message is on stderr
                result["error"] = f"argparse exit {e.code}"
            except Exception as e:  # noqa: BLE001 - report anything the parser raises
                result["error"] = f"{type(e).__name__}: {e}"
        result["said"] = ([f"{w.category.__name__}: {w.message}" for w in caught] + records.messages
                          + [line for line in (out.getvalue() + err.getvalue()).splitlines() if line.strip()])
        if not result["ok"]:
            result["said"] = result["said"][-3:]  # argparse's usage text is long; its error is last
        if result["ok"]:
            result["values"] = {f: getattr(sa, f, None) for f in ROUND_TRIP_FIELDS}
            result["invariants"] = invariants(sa)
            records.messages = []
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result["hook_failures"], result["hooks_skipped"] = run_hooks(sa)
            result["hooks_said"] = records.messages
        results.append(result)
    json.dump(results, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
