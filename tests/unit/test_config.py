"""Configuration: precedence (preset < FLEET_CONFIG file < env), merging of engine args, and one
clear message per invalid configuration (exit 78 through the real CLI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_fleet import config_docs
from sglang_fleet.config import EX_CONFIG, SETTINGS, ConfigError, load_config, preset_names
from sglang_fleet.settings import CONSUL_SETTINGS, SECTIONS

ROOT = Path(__file__).resolve().parents[2]
BASE = {"FLEET_MODEL_PATH": "org/model", "FLEET_NODE_NAME": "node-a"}


def load(**env):
    return load_config({**BASE, **env})


def problems_of(env: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, **env})
    return info.value.problems


# ---------------------------------------------------------------- precedence

def test_defaults():
    cfg = load()
    assert (cfg.role, cfg.cluster, cfg.nnodes, cfg.engine, cfg.net_profile) == ("regular", "default", 1, "sglang", "auto")
    assert (cfg.http_port, cfg.dist_port, cfg.bootstrap_port) == (30000, 20000, 8998)
    assert cfg.group == "node-a"  # a one-node group is named after its node
    assert cfg.consul.http_addr == "127.0.0.1:8500"


def test_preset_then_file_then_env(tmp_path):
    file = tmp_path / "fleet.yaml"
    file.write_text("tp_size: 32\nnnodes: 4\ncluster: from-file\n")
    env = {"FLEET_PRESET": "llama-405b-tp16-2node", "FLEET_GROUP": "g"}
    preset_only = load_config(env)
    assert (preset_only.tp_size, preset_only.nnodes, preset_only.model_path) == (
        16, 2, "meta-llama/Meta-Llama-3.1-405B-Instruct")
    with_file = load_config({**env, "FLEET_CONFIG": str(file)})
    assert (with_file.tp_size, with_file.nnodes, with_file.cluster) == (32, 4, "from-file")
    with_env = load_config({**env, "FLEET_CONFIG": str(file), "FLEET_TP_SIZE": "8", "FLEET_NNODES": "2"})
    assert (with_env.tp_size, with_env.nnodes, with_env.cluster) == (8, 2, "from-file")
    assert with_env.model_path == "meta-llama/Meta-Llama-3.1-405B-Instruct"  # still from the preset


def test_config_file_may_name_the_preset(tmp_path):
    file = tmp_path / "fleet.yaml"
    file.write_text("preset: deepseek-r1-decode\ngroup: r1-decode-a\n")
    cfg = load_config({"FLEET_CONFIG": str(file)})
    assert (cfg.preset, cfg.role, cfg.group, cfg.http_port) == ("deepseek-r1-decode", "decode", "r1-decode-a", 30001)


def test_empty_env_value_means_unset():
    assert load(FLEET_TP_SIZE="").tp_size == 1


def test_engine_args_merge_flag_by_flag(tmp_path):
    file = tmp_path / "fleet.yaml"
    file.write_text("sglang_args:\n  disable-radix-cache: false\n  mem-fraction-static: 0.85\n")
    cfg = load_config({"FLEET_PRESET": "deepseek-r1-prefill", "FLEET_GROUP": "g", "FLEET_CONFIG": str(file),
                       "FLEET_SGLANG_ARGS": "--max-prefill-tokens 16384 --log-level debug"})
    assert cfg.sglang_args == (
        ("chunked-prefill-size", "524288"),
        ("max-prefill-tokens", "16384"),  # replaced in place by the env layer
        ("disaggregation-ib-device", "mlx5_bond_0,mlx5_bond_1,mlx5_bond_2,mlx5_bond_3"),
        ("mem-fraction-static", "0.85"),
        ("log-level", "debug"),
    )  # disable-radix-cache dropped by the file's `false`


def test_engine_args_shell_syntax():
    cfg = load(FLEET_SGLANG_ARGS="--json-model-override-args '{\"a\": 1}' --enable-metrics --x=1 --lora-paths a b")
    assert cfg.sglang_args == (("json-model-override-args", '{"a": 1}'), ("enable-metrics", True),
                               ("x", "1"), ("lora-paths", ("a", "b")))


def test_consul_settings():
    cfg = load(CONSUL_HTTP_ADDR="https://consul.internal:8501", CONSUL_HTTP_TOKEN="t", CONSUL_HTTP_SSL="1")
    assert cfg.consul.host_port == ("consul.internal", 8501)
    assert (cfg.consul.scheme, cfg.consul.token, cfg.consul.ssl) == ("https", "t", True)
    assert "'t'" not in repr(cfg.consul), "the token stays out of reprs (and so of logs)"


def test_consul_token_from_file_and_tls_files(tmp_path):
    (tmp_path / "token").write_text("  s3cret-token\n")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM")
    cfg = load(CONSUL_HTTP_TOKEN_FILE=str(tmp_path / "token"), CONSUL_CACERT=str(tmp_path / "ca.pem"),
               CONSUL_CLIENT_CERT=str(tmp_path / "cert.pem"), CONSUL_CLIENT_KEY=str(tmp_path / "key.pem"))
    assert cfg.consul.token == "s3cret-token"
    assert cfg.consul.token_source == f"CONSUL_HTTP_TOKEN_FILE={tmp_path / 'token'}"
    assert (cfg.consul.cacert, cfg.consul.client_cert, cfg.consul.client_key) == (
        str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


def test_consul_settings_problems_name_the_variable(tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "cert.pem").write_text("PEM")
    assert problems_of({"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "missing")}) == [
        f"CONSUL_HTTP_TOKEN_FILE={str(tmp_path / 'missing')!r}: cannot read it (No such file or directory)"]
    assert problems_of({"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "empty")}) == [
        f"CONSUL_HTTP_TOKEN_FILE={str(tmp_path / 'empty')!r}: the file is empty"]
    assert problems_of({"CONSUL_CACERT": "/nonexistent/ca.pem", "CONSUL_CLIENT_CERT": str(tmp_path / "cert.pem")}) == [
        "CONSUL_CACERT='/nonexistent/ca.pem': no readable file there (a PEM file)",
        f"CONSUL_CLIENT_CERT={str(tmp_path / 'cert.pem')!r}: CONSUL_CLIENT_KEY is not set; a client certificate "
        "needs both"]


IB = "mlx5_bond_0,mlx5_bond_1,mlx5_bond_2,mlx5_bond_3"
R1 = {"nnodes": 2, "model_path": "deepseek-ai/DeepSeek-R1", "tp_size": 16, "dp_size": 16, "attn_dp": True}
LLAMA = "meta-llama/Meta-Llama-3.1-405B-Instruct"
# Every setting a preset changes from the default (the guide's configurations), and its GPUs per node.
PRESETS = {
    "deepseek-r1-prefill": ({**R1, "role": "prefill", "sglang_args": (
        ("chunked-prefill-size", "524288"), ("max-prefill-tokens", "32768"), ("disable-radix-cache", True),
        ("disaggregation-ib-device", IB))}, 8),
    "deepseek-r1-decode": ({**R1, "role": "decode", "http_port": 30001, "sglang_args": (
        ("cuda-graph-max-bs-decode", "64"), ("max-running-requests", "2048"), ("disaggregation-ib-device", IB))}, 8),
    "deepseek-v3-tp16-ep16-2node": ({"nnodes": 2, "model_path": "deepseek-ai/DeepSeek-V3", "tp_size": 16,
                                     "ep_size": 16, "dp_size": 16, "attn_dp": True, "dp_lm_head": True,
                                     "moe_a2a_backend": "deepep", "ep_redundant_experts": 32}, 8),
    "llama-405b-slurm-xgrammar": ({"nnodes": 2, "model_path": LLAMA, "tp_size": 16, "dist_port": 8000,
                                   "sglang_args": (("grammar-backend", "xgrammar"),)}, 8),
    "llama-405b-tp16-2node": ({"nnodes": 2, "model_path": LLAMA, "tp_size": 16}, 8),
    "llama-405b-tp32-4node": ({"nnodes": 4, "model_path": LLAMA, "tp_size": 32}, 8),
    "sim-demo": ({"engine": "sim", "model_path": "sim/tiny-chat"}, 1),
}


def test_every_preset_has_expectations():
    assert sorted(PRESETS) == preset_names()


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    cfg = load_config({"FLEET_PRESET": name, "FLEET_GROUP": "g", "FLEET_NODE_NAME": "node-a"})
    changed = {s.key: getattr(cfg, s.key) for s in SETTINGS
               if getattr(cfg, s.key) != s.default and s.key not in ("preset", "group", "node_name")}
    expected, gpus_per_node = PRESETS[name]
    assert (changed, cfg.gpus_per_node, cfg.preset) == (expected, gpus_per_node, name)


def test_attention_dp_counts_no_extra_gpus():
    cfg = load_config({"FLEET_PRESET": "deepseek-v3-tp16-ep16-2node", "FLEET_GROUP": "g"})
    assert (cfg.world_size, cfg.gpus_per_node) == (16, 8)
    replicas = load(FLEET_TP_SIZE="4", FLEET_DP_SIZE="2")
    assert replicas.world_size == 8


# ---------------------------------------------------------------- invalid configurations
# (environment, text the one message must contain: the variable, the value, what is allowed)
INVALID = [
    ({"FLEET_ROLE": "worker"}, ["FLEET_ROLE", "'worker'", "one of prefill, decode, regular, router"]),
    ({"FLEET_NNODES": "two"}, ["FLEET_NNODES", "'two'", "whole number"]),
    ({"FLEET_NNODES": "0"}, ["FLEET_NNODES=0", "at least 1"]),
    ({"FLEET_NNODES": "2", "FLEET_TP_SIZE": "2"}, ["FLEET_GROUP", "FLEET_NNODES=2", "required"]),
    ({"FLEET_NNODES": "2", "FLEET_TP_SIZE": "2", "FLEET_GROUP": "g", "FLEET_NODE_RANK": "2"},
     ["FLEET_NODE_RANK=2", "between 0 and FLEET_NNODES-1 (1)"]),
    ({"FLEET_NODE_RANK": "-1"}, ["FLEET_NODE_RANK=-1", "between 0"]),
    ({"FLEET_NNODES": "2", "FLEET_GROUP": "g", "FLEET_TP_SIZE": "3"},
     ["FLEET_TP_SIZE=3", "divisible by FLEET_NNODES=2"]),
    ({"FLEET_TP_SIZE": "-4"}, ["FLEET_TP_SIZE=-4", "at least 1"]),
    ({"FLEET_TP_SIZE": "8", "FLEET_EP_SIZE": "3"}, ["FLEET_EP_SIZE=3", "divide FLEET_TP_SIZE=8"]),
    ({"FLEET_TP_SIZE": "8", "FLEET_DP_SIZE": "3", "FLEET_ATTN_DP": "1"},
     ["FLEET_DP_SIZE=3", "divide FLEET_TP_SIZE=8", "attn_dp_size"]),
    ({"FLEET_ATTN_DP": "1"}, ["FLEET_ATTN_DP=1", "FLEET_DP_SIZE > 1"]),
    ({"FLEET_DP_LM_HEAD": "1"}, ["FLEET_DP_LM_HEAD=1", "needs FLEET_ATTN_DP=1"]),
    ({"FLEET_MOE_A2A_BACKEND": "deepep"}, ["FLEET_MOE_A2A_BACKEND='deepep'", "needs FLEET_EP_SIZE > 1"]),
    ({"FLEET_MOE_A2A_BACKEND": "nccl"}, ["FLEET_MOE_A2A_BACKEND", "'nccl'", "one of none, deepep"]),
    ({"FLEET_EP_REDUNDANT_EXPERTS": "32"}, ["FLEET_EP_REDUNDANT_EXPERTS=32", "needs FLEET_EP_SIZE > 1"]),
    ({"FLEET_GROUP": "bad/group"}, ["FLEET_GROUP='bad/group'", "letters, digits"]),
    ({"FLEET_CLUSTER": "has space"}, ["FLEET_CLUSTER='has space'", "letters, digits"]),
    ({"FLEET_HTTP_PORT": "70000"}, ["FLEET_HTTP_PORT=70000", "between 1 and 65535"]),
    ({"FLEET_ROLE": "prefill", "FLEET_BOOTSTRAP_PORT": "30000"},
     ["FLEET_BOOTSTRAP_PORT=30000", "differ from FLEET_HTTP_PORT"]),
    ({"FLEET_DIST_PORT": "30000"}, ["FLEET_HTTP_PORT=30000: collides with FLEET_DIST_PORT=30000"]),
    # Attention DP: SGLang also binds dist-init +1..+6 and +13 (srt/server_args.py, data_parallel_controller.py).
    ({"FLEET_DIST_PORT": "29987", "FLEET_TP_SIZE": "16", "FLEET_DP_SIZE": "16", "FLEET_ATTN_DP": "1"},
     ["FLEET_HTTP_PORT=30000: collides with FLEET_DIST_PORT=29987", "29987-29993 and 30000"]),
    ({"FLEET_ROLE": "prefill", "FLEET_BOOTSTRAP_PORT": "20004", "FLEET_TP_SIZE": "8", "FLEET_DP_SIZE": "8",
      "FLEET_ATTN_DP": "1"}, ["FLEET_BOOTSTRAP_PORT=20004: collides with FLEET_DIST_PORT=20000"]),
    ({"FLEET_SGLANG_ARGS": "--tp 16"}, ["FLEET_SGLANG_ARGS", "--tp", "use FLEET_TP_SIZE"]),
    ({"FLEET_SGLANG_ARGS": "--disaggregation-mode decode"},
     ["FLEET_SGLANG_ARGS", "--disaggregation-mode", "use FLEET_ROLE"]),
    ({"FLEET_ROLE": "decode", "FLEET_SGLANG_ARGS": "--chunked-prefill-size 8192"},
     ["FLEET_SGLANG_ARGS", "--chunked-prefill-size", "prefill option", "FLEET_ROLE=decode"]),
    ({"FLEET_SGLANG_ARGS": "chunked 8192"}, ["FLEET_SGLANG_ARGS", "'chunked 8192'", "expected a --flag"]),
    ({"FLEET_SGLANG_ARGS": "--x 'open"}, ["FLEET_SGLANG_ARGS", "No closing quotation", "--flag value"]),
    ({"FLEET_ENGINE": "vllm"}, ["FLEET_ENGINE='vllm'", "one of sglang, sim"]),
    ({"FLEET_NET_PROFILE": "myrinet"}, ["FLEET_NET_PROFILE='myrinet'", "one of auto, ethernet, infiniband, roce"]),
    ({"FLEET_RANK0": "maybe"}, ["FLEET_RANK0='maybe'", "1/0, true/false"]),
    ({"FLEET_READY_TIMEOUT": "0"}, ["FLEET_READY_TIMEOUT=0", "more than zero"]),
    ({"FLEET_STOP_GRACE": "-1"}, ["FLEET_STOP_GRACE=-1", "zero or more"]),
    ({"FLEET_BACKOFF_MAX": "0.5"}, ["FLEET_BACKOFF_MAX=0.5", "at least FLEET_BACKOFF_BASE=1.0"]),
    ({"FLEET_START_ATTEMPTS": "0"}, ["FLEET_START_ATTEMPTS=0", "at least 1"]),
    ({"FLEET_ADVERTISE_ADDR": "http://10.0.0.1:80"},
     ["FLEET_ADVERTISE_ADDR='http://10.0.0.1:80'", "IP address or host name"]),
    ({"FLEET_PRESET": "nope"}, ["FLEET_PRESET='nope'", "no such preset", "deepseek-r1-prefill"]),
    ({"CONSUL_HTTP_ADDR": "127.0.0.1:notaport"}, ["CONSUL_HTTP_ADDR='127.0.0.1:notaport'", "host:port"]),
    ({"CONSUL_HTTP_SSL": "perhaps"}, ["CONSUL_HTTP_SSL='perhaps'", "1/0"]),
    ({"FLEET_MODEL_PATH": ""}, ["FLEET_MODEL_PATH", "not set", "Hugging Face id"]),
    ({"FLEET_LOG_FORMAT": "xml"}, ["FLEET_LOG_FORMAT='xml'", "one of auto, json, console"]),
]


@pytest.mark.parametrize("env, expected", INVALID, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in INVALID])
def test_invalid_configuration_gives_one_clear_message(env, expected):
    problems = problems_of(env)
    assert len(problems) == 1, problems
    for text in expected:
        assert text in problems[0], (text, problems[0])


def test_every_problem_is_reported_at_once():
    problems = problems_of({"FLEET_ROLE": "worker", "FLEET_HTTP_PORT": "0", "FLEET_TP_SIZE": "x"})
    assert problems == [  # parsing first, in table order, then the cross-field checks
        "FLEET_ROLE='worker': must be one of prefill, decode, regular, router",
        "FLEET_TP_SIZE='x': expected a whole number",
        "FLEET_HTTP_PORT=0: must be a port number between 1 and 65535",
    ]
    assert ConfigError(problems).report() == "\n".join([
        "sglang-fleet: configuration error (3 problems):", *(f"  - {p}" for p in problems)])


def test_bad_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tp_size: [1,\n")
    assert "not valid YAML" in problems_of({"FLEET_CONFIG": str(bad_yaml)})[0]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("tp: 16\n")
    assert "unknown setting 'tp'" in problems_of({"FLEET_CONFIG": str(unknown)})[0]
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n")
    assert "must hold a mapping" in problems_of({"FLEET_CONFIG": str(not_mapping)})[0]
    assert "cannot read" in problems_of({"FLEET_CONFIG": str(tmp_path / "missing.yaml")})[0]
    in_file = tmp_path / "typed.yaml"
    in_file.write_text("nnodes: two\n")
    assert f"{in_file}: nnodes='two': expected a whole number" in problems_of({"FLEET_CONFIG": str(in_file)})[0]


# ---------------------------------------------------------------- through the real CLI

def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    return subprocess.run([sys.executable, "-m", "sglang_fleet", *(args or ("plan",))], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, expected", [
    ({"FLEET_ROLE": "worker"}, "FLEET_ROLE='worker': must be one of prefill, decode, regular, router"),
    ({"FLEET_NNODES": "2", "FLEET_GROUP": "g", "FLEET_TP_SIZE": "3"}, "must be divisible by FLEET_NNODES=2"),
    ({"FLEET_SGLANG_ARGS": "--tp 16"}, "--tp is set by sglang-fleet; use FLEET_TP_SIZE"),
    ({"FLEET_PRESET": "nope"}, "FLEET_PRESET='nope': no such preset"),
])
def test_cli_exits_78_without_traceback(env, expected):
    proc = run_cli({**BASE, **env})
    assert proc.returncode == EX_CONFIG == 78
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_config_check_is_silent_when_good_and_reports_like_every_command():
    good = run_cli(BASE, "config", "check")
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    bad = run_cli({**BASE, "FLEET_ROLE": "worker", "FLEET_TP_SIZE": "x"}, "config", "check")
    assert (bad.returncode, bad.stdout) == (78, "")
    assert bad.stderr == run_cli({**BASE, "FLEET_ROLE": "worker", "FLEET_TP_SIZE": "x"}, "plan").stderr == (
        "sglang-fleet: configuration error (2 problems):\n"
        "  - FLEET_ROLE='worker': must be one of prefill, decode, regular, router\n"
        "  - FLEET_TP_SIZE='x': expected a whole number\n")


def test_stop_wait_follows_the_loaded_configuration(tmp_path):
    assert run_cli(BASE, "config", "stop-wait").stdout == "75\n"  # 30 s drain + 30 s grace + 15 s
    file = tmp_path / "fleet.yaml"
    file.write_text("stop_grace: 45.5\n")  # a config file's value counts, not only FLEET_STOP_GRACE
    proc = run_cli({**BASE, "FLEET_CONFIG": str(file), "FLEET_DRAIN_TIMEOUT": "10"}, "config", "stop-wait")
    assert (proc.returncode, proc.stdout) == (0, "71\n")
    assert run_cli({**BASE, "FLEET_STOP_GRACE": "-1"}, "config", "stop-wait").returncode == 78


# ---------------------------------------------------------------- docs

def test_the_settings_tables_of_the_docs_are_generated_from_the_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config_docs.render(doc) == doc, f"docs/configuration.md differs from the settings table: run {config_docs.REGENERATE}"


def test_every_setting_is_documented_in_its_section():
    tables = config_docs.settings_markdown()
    for s in SETTINGS + CONSUL_SETTINGS:
        section = tables.split(f"### {SECTIONS[s.section]}\n")[1].split("### ")[0]
        assert f"| `{s.env}`" in section, s.env
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name in ["FLEET_CONFIG", *preset_names()]:  # the hand-written parts
        assert name in doc, name


def test_docs_without_the_markers_are_refused(tmp_path):
    doc = tmp_path / "configuration.md"
    doc.write_text("# Configuration\n")
    assert config_docs.write(doc) == 1 and doc.read_text() == "# Configuration\n"


def test_config_list_shows_every_setting_by_section(capsys):
    assert config_docs.list_settings(as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["env"] for r in rows] == [s.env for sec in SECTIONS for s in SETTINGS + CONSUL_SETTINGS
                                        if s.section == sec]
    assert rows[0] == {"section": "node", "env": "FLEET_ROLE", "key": "role", "default": "'regular'",
                       "help": SETTINGS[0].help, "example": "prefill", "choices": "prefill|decode|regular|router"}
    config_docs.list_settings(as_json=False)
    text = capsys.readouterr().out
    assert text.index("# Router role") < text.index("FLEET_ROUTER_PORT (router_port) = 8000: ") < text.index(
        "# Consul") < text.index("CONSUL_HTTP_SSL = False: Use HTTPS.")


# ---------------------------------------------------------------- keys and the router's TLS (docs/security.md)

def test_the_router_key_defaults_to_the_engine_key_and_keys_come_from_files(tmp_path):
    key_file = tmp_path / "engine.key"
    key_file.write_text("ek\n")
    cfg = load(FLEET_ENGINE_API_KEY_FILE=str(key_file), FLEET_ENGINE_ADMIN_API_KEY="adm")
    assert (cfg.engine_api_key, cfg.router_api_key, cfg.engine_admin_api_key) == ("ek", "ek", "adm")
    assert load(FLEET_ROUTER_API_KEY="rk").router_api_key == "rk"  # no engine key: any client key
    assert load(FLEET_ROUTER_API_KEY="ek", FLEET_ENGINE_API_KEY="ek").router_api_key == "ek"
    assert "ek" not in repr(cfg) and "adm" not in repr(cfg)


@pytest.mark.parametrize("role", ["router", "regular"])
def test_a_router_key_that_differs_from_the_engine_key_is_refused_without_showing_either(role):
    [problem] = problems_of({"FLEET_ROLE": role, "FLEET_ROUTER_API_KEY": "rk-123", "FLEET_ENGINE_API_KEY": "ek-456"})
    assert problem.startswith("FLEET_ROUTER_API_KEY: differs from FLEET_ENGINE_API_KEY")
    assert "rk-123" not in problem and "ek-456" not in problem


def test_router_tls_needs_both_readable_files(tmp_path):
    cert = tmp_path / "router.pem"
    cert.write_text("x")
    assert problems_of({"FLEET_ROLE": "router", "FLEET_ROUTER_TLS_CERT": str(cert)}) == [
        f"FLEET_ROUTER_TLS_CERT={str(cert)!r}: FLEET_ROUTER_TLS_KEY is not set; smg's HTTPS listener needs both"]
    missing = tmp_path / "nope.pem"
    assert problems_of({"FLEET_ROLE": "router", "FLEET_ROUTER_TLS_CERT": str(cert),
                        "FLEET_ROUTER_TLS_KEY": str(missing)}) == [
        f"FLEET_ROUTER_TLS_KEY={str(missing)!r}: no readable file there (a PEM file)"]


@pytest.mark.parametrize("args, setting", [("--api-key x", "FLEET_ENGINE_API_KEY"),
                                           ("--admin-api-key=x", "FLEET_ENGINE_ADMIN_API_KEY")])
def test_engine_keys_on_the_command_line_are_reserved(args, setting):
    [problem] = problems_of({"FLEET_SGLANG_ARGS": args})
    assert problem.startswith(f"FLEET_SGLANG_ARGS: --{args[2:].split()[0].split('=')[0]} is set by sglang-fleet; "
                              f"use {setting} (or {setting}_FILE)")


def test_a_config_file_of_the_user_conflicts_with_the_engine_keys():
    assert load(FLEET_SGLANG_ARGS="--config /etc/sglang.yaml").sglang_args == (("config", "/etc/sglang.yaml"),)
    [problem] = problems_of({"FLEET_SGLANG_ARGS": "--config /etc/sglang.yaml", "FLEET_ENGINE_API_KEY": "k"})
    assert problem.startswith("FLEET_SGLANG_ARGS: --config cannot be combined with FLEET_ENGINE_API_KEY")


@pytest.mark.parametrize("env, expected", [
    ({"FLEET_ROLE": "router", "FLEET_ROUTER_API_KEY": "a", "FLEET_ENGINE_API_KEY": "b"},
     "FLEET_ROUTER_API_KEY: differs from FLEET_ENGINE_API_KEY"),
    ({"FLEET_ROLE": "router", "FLEET_ROUTER_TLS_KEY": "/etc/hosts"}, "FLEET_ROUTER_TLS_CERT is not set"),
    ({"FLEET_SGLANG_ARGS": "--api-key k"}, "--api-key is set by sglang-fleet; use FLEET_ENGINE_API_KEY"),
])
def test_key_and_tls_mistakes_exit_78_with_one_line(env, expected):
    proc = run_cli({**BASE, **env}, "config", "check")
    assert proc.returncode == EX_CONFIG
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("  - ")]
    assert len(problems) == 1 and expected in problems[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_router_agents_own_smg_flags_are_reserved():
    [problem] = problems_of({"FLEET_ROLE": "router", "FLEET_ROUTER_ARGS": "--control-plane-api-keys a:b:admin:c"})
    assert problem == ("FLEET_ROUTER_ARGS: --control-plane-api-keys is set by sglang-fleet; use FLEET_ROUTER_ADMIN_KEY "
                       "(or FLEET_ROUTER_ADMIN_KEY_FILE) instead")
    assert "a:b:admin:c" not in problem


def test_shipped_files_come_from_the_package_and_an_operators_directory_first(tmp_path, monkeypatch):
    from sglang_fleet import shipped
    assert shipped.find(shipped.PRESETS, "sim-demo") == shipped.package_dir(shipped.PRESETS) / "sim-demo.yaml"
    assert shipped.find(shipped.PRESETS, "../presets/sim-demo") is None  # a name, never a path
    (tmp_path / "sim-demo.yaml").write_text("nnodes: 1\n")
    (tmp_path / "site-only.yaml").write_text("nnodes: 1\n")
    monkeypatch.setenv("FLEET_PRESET_DIR", str(tmp_path))
    assert shipped.find(shipped.PRESETS, "sim-demo") == tmp_path / "sim-demo.yaml"
    assert {"site-only", "sim-demo", "llama-405b-tp16-2node"} <= set(preset_names())
    assert str(tmp_path) in shipped.searched(shipped.PRESETS)
