"""What an operator types: unknown FLEET_* variables, engine flags after `--` and as container arguments,
`config show`, and the settings `node --help` / `router --help` name."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_fleet.config import ConfigError, load_config, load_config_sources
from sglang_fleet.settings import OTHER_FLEET_VARIABLES, known_variables, settings_read_by

ROOT = Path(__file__).resolve().parents[2]
BASE = {"FLEET_MODEL_PATH": "org/model", "FLEET_NODE_NAME": "node-a"}


def run_cli(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    return subprocess.run([sys.executable, "-m", "sglang_fleet", *args], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- unknown FLEET_* variables

@pytest.mark.parametrize("typo, meant", [("FLEET_NNODE", "FLEET_NNODES"), ("FLEET_TP", "FLEET_TP_SIZE"),
                                         ("FLEET_ROUTER_API_KEYS", "FLEET_ROUTER_API_KEY"),
                                         ("FLEET_CONFG", "FLEET_CONFIG")])
def test_an_unknown_fleet_variable_names_the_nearest_setting(typo, meant):
    proc = run_cli({**BASE, typo: "2"}, "plan")
    assert proc.returncode == 78 and proc.stdout == ""
    assert f"  - {typo}: unknown setting; did you mean {meant}?" in proc.stderr.splitlines()


def test_an_unknown_variable_without_a_near_name_points_to_the_list():
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, "FLEET_XYZZY_PLUGH": "1"})
    assert e.value.problems == ["FLEET_XYZZY_PLUGH: unknown setting; the settings are listed by "
                                "`sglang-fleet config list` and in docs/configuration.md"]


def test_variables_of_the_image_scripts_and_tests_are_not_settings_and_not_errors():
    env = {**BASE, **dict.fromkeys(OTHER_FLEET_VARIABLES, "x"), "FLEET_CONFIG": "",
           "FLEET_ROUTER_API_KEY_FILE": ""}
    assert load_config(env).model_path == "org/model"


def test_every_fleet_variable_the_repository_uses_is_known():
    """Scripts, compose files, the image and tests may read FLEET_* variables: each must be a setting or be
    listed in OTHER_FLEET_VARIABLES, or starting a node with it exported would fail."""
    not_variables = {"FLEET_BIN", "FLEET_SECRET"}  # a Python constant; a test's stand-in for an unknown secret
    files = [p for d in ("entrypoint", "scripts", "compose", "config", "tests") for p in (ROOT / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
    files.append(ROOT / "Dockerfile")
    used = {m for p in files for m in re.findall(r"(?<![A-Z_])FLEET_[A-Z0-9_]*[A-Z0-9]", p.read_text(errors="ignore"))}
    unknown = used - known_variables() - not_variables - {"FLEET_XYZZY_PLUGH", "FLEET_NNODE", "FLEET_TP",
                                                          "FLEET_ROUTER_API_KEYS", "FLEET_CONFG"}
    assert not unknown, f"add them to settings.OTHER_FLEET_VARIABLES (or make them settings): {sorted(unknown)}"


# ---------------------------------------------------------------- config show

def test_config_show_names_each_value_and_where_it_came_from(tmp_path):
    file = tmp_path / "fleet.yaml"
    file.write_text("stop_grace: 12\nsglang_args: {log-level: debug}\n")
    env = {**BASE, "FLEET_PRESET": "llama-405b-tp16-2node", "FLEET_GROUP": "g", "FLEET_CONFIG": str(file),
           "FLEET_SGLANG_ARGS": "--ssl-keyfile-password hush", "FLEET_ROUTER_API_KEY": "s3cret", "CONSUL_HTTP_TOKEN": "tok"}
    proc = run_cli(env, "config", "show", "--json", "--", "--mem-fraction-static", "0.85")
    assert proc.returncode == 0, proc.stderr
    rows = {r["env"]: r for r in json.loads(proc.stdout)}
    assert (rows["FLEET_ROLE"]["value"], rows["FLEET_ROLE"]["source"]) == ("regular", "default")
    assert (rows["FLEET_TP_SIZE"]["value"], rows["FLEET_TP_SIZE"]["source"]) == ("16", "preset llama-405b-tp16-2node")
    assert (rows["FLEET_STOP_GRACE"]["value"], rows["FLEET_STOP_GRACE"]["source"]) == ("12.0", f"file {file}")
    assert (rows["FLEET_GROUP"]["value"], rows["FLEET_GROUP"]["source"]) == ("g", "env FLEET_GROUP")
    assert rows["FLEET_SGLANG_ARGS"]["source"] == f"file {file} + env FLEET_SGLANG_ARGS + command line"
    assert rows["FLEET_SGLANG_ARGS"]["value"] == "--log-level debug --ssl-keyfile-password *** --mem-fraction-static 0.85"
    assert rows["FLEET_ROUTER_API_KEY"]["value"] == rows["CONSUL_HTTP_TOKEN"]["value"] == "***"
    assert rows["CONSUL_HTTP_TOKEN"]["source"] == "env CONSUL_HTTP_TOKEN"
    assert "hush" not in proc.stdout and "s3cret" not in proc.stdout and "tok\"" not in proc.stdout
    text = run_cli(env, "config", "show").stdout
    assert "FLEET_TP_SIZE=16  # preset llama-405b-tp16-2node" in text.splitlines()
    assert "s3cret" not in text


def test_config_show_reads_a_secret_file_and_says_so(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    _, sources = load_config_sources({**BASE, "FLEET_ROUTER_API_KEY_FILE": str(secret)})
    assert sources["router_api_key"] == "env FLEET_ROUTER_API_KEY_FILE"
    assert sources["node_name"] == "env FLEET_NODE_NAME" and sources["group"] == "node name (a one-node group)"


def test_config_show_of_a_bad_configuration_is_the_usual_report():
    proc = run_cli({**BASE, "FLEET_NNODE": "2"}, "config", "show")
    assert proc.returncode == 78 and "did you mean FLEET_NNODES?" in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------- --help names the settings

@pytest.mark.parametrize("command", ["node", "router"])
def test_help_names_every_setting_the_command_reads(command):
    proc = run_cli({}, command, "--help")
    assert proc.returncode == 0
    words = set(re.findall(r"[A-Z][A-Z0-9_]+", proc.stdout))
    assert {s.env for s in settings_read_by(command)} <= words
    assert ("FLEET_TP_SIZE" in words) == (command == "node") and ("FLEET_ROUTER_PORT" in words) == (command == "router")


# ---------------------------------------------------------------- engine flags after `--`

def test_flags_after_double_dash_are_extra_engine_flags_over_fleet_sglang_args():
    proc = run_cli({**BASE, "FLEET_SGLANG_ARGS": "--mem-fraction-static 0.7 --log-level debug"},
                   "plan", "--json", "--", "--mem-fraction-static", "0.85", "--enable-metrics")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.85" and argv.count("--mem-fraction-static") == 1
    assert "--enable-metrics" in argv and argv[argv.index("--log-level") + 1] == "debug"


@pytest.mark.parametrize("args, expected", [
    (["--port", "1"], "engine arguments: --port is set by sglang-fleet; use FLEET_HTTP_PORT instead"),
    (["--tp", "16"], "engine arguments: --tp is set by sglang-fleet; use FLEET_TP_SIZE instead"),
    (["mem-fraction-static", "0.8"], "engine arguments='mem-fraction-static 0.8': expected a --flag"),
])
def test_bad_engine_flags_after_double_dash_exit_78(args, expected):
    for command in (["plan"], ["node"], ["config", "check"]):
        proc = run_cli({**BASE, "CONSUL_HTTP_ADDR": "127.0.0.1:1"}, *command, "--", *args)
        assert proc.returncode == 78, (command, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_engine_flags_are_refused_where_no_engine_runs():
    router = run_cli({**BASE, "FLEET_ROLE": "router"}, "config", "check", "--", "--mem-fraction-static", "0.8")
    assert router.returncode == 78 and "FLEET_ROLE='router' runs no engine" in router.stderr
    status = run_cli(BASE, "status", "--", "--mem-fraction-static", "0.8")
    assert status.returncode == 2 and "engine flags after `--` are for" in status.stderr


def test_without_sglang_anywhere_plan_says_the_flags_were_not_checked(tmp_path):
    proc = run_cli({**BASE, "FLEET_ENGINE_PYTHON": sys.executable}, "plan", "--json", "--", "--bogus-flag", "1")
    assert proc.returncode == 0, proc.stderr
    assert any(w.startswith("engine flags not checked by SGLang's parser") for w in json.loads(proc.stdout)["warnings"])


# ---------------------------------------------------------------- the image's entrypoint

@pytest.fixture
def entrypoint(tmp_path):
    """docker-entrypoint.sh with this venv as the image's, and a pid1.py that prints the supervisord config
    it was given instead of running supervisord."""
    sup_dir = tmp_path / "supervisord"
    shutil.copytree(ROOT / "config" / "supervisord", sup_dir)
    (sup_dir / "pid1.py").write_text("import sys\nprint(open(sys.argv[2]).read())\n")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
        return subprocess.run(["bash", str(ROOT / "entrypoint" / "docker-entrypoint.sh"), *args], cwd=tmp_path,
                              env={**clean, **BASE, "FLEET_HOME": str(Path(sys.executable).parent.parent),
                                   "SUPERVISOR_DIR": str(sup_dir), "SUPERVISOR_RUN_DIR": str(tmp_path / "run"),
                                   **env}, capture_output=True, text=True, timeout=120)
    return run


def test_container_arguments_are_engine_flags(entrypoint):
    proc = entrypoint("--mem-fraction-static", "0.85", "--json-model-override-args", '{"rope": "50%"}')
    assert proc.returncode == 0, proc.stderr
    [command] = [line for line in proc.stdout.splitlines() if line.startswith("command=sglang-fleet")]
    # supervisord expands %(...)s, then splits the command with shlex.
    assert shlex.split(command.removeprefix("command=").replace("%%", "%")) == [
        "sglang-fleet", "node", "--", "--mem-fraction-static", "0.85", "--json-model-override-args", '{"rope": "50%"}']


def test_container_arguments_with_a_reserved_flag_exit_78_before_supervisord(entrypoint):
    proc = entrypoint("--port", "9000")
    assert proc.returncode == 78 and proc.stdout == ""
    assert "engine arguments: --port is set by sglang-fleet; use FLEET_HTTP_PORT instead" in proc.stderr


def test_no_container_arguments_leave_the_program_as_it_is(entrypoint):
    proc = entrypoint()
    assert proc.returncode == 0, proc.stderr
    assert "command=sglang-fleet node\n" in proc.stdout
