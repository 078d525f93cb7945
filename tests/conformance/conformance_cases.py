"""Every engine argv sglang-fleet can produce that the conformance tier checks: each preset at each
rank, and a table of role/size combinations (with the guide's old spellings in FLEET_SGLANG_ARGS)."""
from __future__ import annotations

from dataclasses import dataclass

from sglang_fleet import launch
from sglang_fleet.config import load_config, preset_names

DIST_INIT_ADDR = "10.0.0.1:20000"
ADVERTISE_ADDR = "10.0.0.2"  # not a local address: no interface lookup matters here


@dataclass(frozen=True)
class Case:
    id: str
    env: dict
    rank: int

    def build(self):
        cfg = load_config({"FLEET_NET_PROFILE": "ethernet", "FLEET_NODE_NAME": "conformance", **self.env})
        built = launch.build_launch(cfg, self.rank, cfg.nnodes, DIST_INIT_ADDR, ADVERTISE_ADDR, parent_env={})
        skip = 4 if cfg.engine == "sim" else 3  # [python, -m, module] or [python, -m, sglang_fleet, sim-engine]
        return cfg, built.argv[skip:]


def _sizes(role, nnodes, tp, **more):
    env = {"FLEET_ROLE": role, "FLEET_NNODES": str(nnodes), "FLEET_TP_SIZE": str(tp),
           "FLEET_MODEL_PATH": "org/model", "FLEET_GROUP": "g"}
    env.update({f"FLEET_{k.upper()}": str(v) for k, v in more.items()})
    return env


TABLE = {
    "regular-1node-tp1": _sizes("regular", 1, 1),
    "regular-2node-tp16": _sizes("regular", 2, 16),
    "regular-4node-tp32": _sizes("regular", 4, 32),
    "regular-2node-tp8-pp2": _sizes("regular", 2, 8, pp_size=2),
    "regular-1node-tp4-dp2-replicas": _sizes("regular", 1, 4, dp_size=2),
    "prefill-1node-tp8": _sizes("prefill", 1, 8),
    "prefill-2node-tp16-attn-dp16": _sizes("prefill", 2, 16, dp_size=16, attn_dp=1, bootstrap_port=9000),
    "decode-1node-tp8": _sizes("decode", 1, 8),
    "decode-2node-tp16-ep16-deepep-attn-dp16": _sizes(
        "decode", 2, 16, ep_size=16, dp_size=16, attn_dp=1, dp_lm_head=1, moe_a2a_backend="deepep",
        ep_redundant_experts=32),
    "regular-2node-tp16-ep8": _sizes("regular", 2, 16, ep_size=8),
    "guide-spellings-decode": _sizes(
        "decode", 2, 16, dp_size=16, sglang_args="--enable-dp-attention --cuda-graph-max-bs 64 --ep 16"),
    "guide-spellings-regular": _sizes("regular", 1, 8, sglang_args="--disable-cuda-graph --dp 2"),
    "sim-2node-tp2": _sizes("regular", 2, 2, engine="sim"),
    # FLEET_DEVICE=cpu, as the real-engine tier (tests/sglang) runs it.
    "cpu-2node-tp2": _sizes("regular", 2, 2, device="cpu", cpu_cores="0", sglang_args=(
        "--attention-backend torch_native --disable-overlap-schedule --max-total-tokens 4096")),
    "sim-prefill": _sizes("prefill", 1, 1, engine="sim"),
}


def all_cases() -> list[Case]:
    cases = []
    for name in preset_names():
        cfg = load_config({"FLEET_PRESET": name, "FLEET_GROUP": "g", "FLEET_NET_PROFILE": "ethernet",
                           "FLEET_NODE_NAME": "conformance"})
        cases += [Case(f"preset-{name}-rank{r}", {"FLEET_PRESET": name, "FLEET_GROUP": "g"}, r)
                  for r in range(cfg.nnodes)]
    for name, env in TABLE.items():
        nnodes = int(env["FLEET_NNODES"])
        cases += [Case(f"{name}-rank{r}", env, r) for r in range(nnodes)]
    return cases
