"""Configuration: frozen settings built from preset YAML <- config file <- environment (env wins).

The settings themselves are declared once, in settings.py; this module loads the layers. The
environment spells a key `FLEET_<KEY>`, preset and config files spell it `<key>`. `load_config()`
collects every problem (parsing here, cross-field checks in validation.py) and raises one
`ConfigError`; the CLI and the container entrypoint print its report and exit 78, before anything is
started.
"""
from __future__ import annotations

import difflib
import os
import shlex
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from sglang_fleet import shipped
from sglang_fleet.settings import (CONSUL_SETTINGS, MOE_A2A_BACKENDS, NODE_ROLES, ROLES, SETTING_BY_KEY, SETTINGS,
                                   ConsulSettings, FleetConfig, Setting, engine_args_layer, describe_settings,
                                   known_variables, parse_cpu_list)
from sglang_fleet.validation import NAME_RE, reserved_flag_problems, validate_config

EX_CONFIG = 78  # sysexits.h: configuration error

# SGLang flags that set up one host, not the group: they may differ between members (rendezvous.py's
# fingerprint leaves them out).
PER_HOST_ENGINE_FLAGS = frozenset({
    "disaggregation-ib-device", "base-gpu-id", "gpu-id-step", "host", "port", "log-level",
    "mem-fraction-static", "enable-metrics", "log-requests",
})

# Merged flag by flag over the lower layers instead of replaced.
MERGED_KEYS = ("sglang_args", "router_args")


class ConfigError(Exception):
    """Every problem found in one configuration; str() is the problems, report() what a user sees."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def report(self) -> str:
        """The one report the CLI, `plan` and the container entrypoint print on stderr."""
        n = len(self.problems)
        return "\n".join([f"sglang-fleet: configuration error ({n} problem{'s' if n != 1 else ''}):",
                          *(f"  - {p}" for p in self.problems)])


def find_preset(name: str) -> Path | None:
    return shipped.find(shipped.PRESETS, name)


def preset_names() -> list[str]:
    return shipped.names(shipped.PRESETS)


def _read_yaml(path: Path, what: str, problems: list[str]) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        problems.append(f"{what}: cannot read {path}: {e.strerror}")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"{what}: {path} is not valid YAML: {e}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{what}: {path} must hold a mapping of settings, got {type(data).__name__}")
        return {}
    data.pop("description", None)
    unknown = sorted(set(data) - set(SETTING_BY_KEY))
    for key in unknown:
        problems.append(f"{what}: {path}: unknown setting {key!r} (known: see docs/configuration.md)")
    return {k: v for k, v in data.items() if k in SETTING_BY_KEY}


def _parse(setting: Setting, raw: Any, source: str, problems: list[str]) -> Any:
    try:
        value = setting.parse(raw)
    except ValueError as e:
        problems.append(f"{source}={raw!r}: {e}")
        return setting.default
    if setting.choices and value not in setting.choices:
        problems.append(f"{source}={raw!r}: must be one of {', '.join(setting.choices)}")
        return setting.default
    return value


def _merge_engine_args(base: tuple, raw: Any, label: str, problems: list[str]) -> tuple:
    """Flag by flag: a later layer replaces a flag in place, adds new ones, and `flag: false` drops one."""
    try:
        pairs = engine_args_layer(raw)
    except ValueError as e:
        problems.append(f"{label}={raw!r}: {e} (shell-quoted --flag value pairs, e.g. "
                        f"'--chunked-prefill-size 8192 --disable-radix-cache')")
        return base
    merged = dict(base)
    for name, val in pairs:
        if val is None:
            merged.pop(name, None)
        else:
            merged[name] = val
    return tuple(merged.items())


def secret_from_file(s: Setting, env: Mapping[str, str], problems: list[str]) -> str | None:
    """A secret setting's value from the file `<env>_FILE` names (Consul's and Docker's convention: the
    secret stays out of `docker inspect` and the process table), or None when that is not set."""
    path = (env.get(s.env + "_FILE") or "").strip()
    if not path:
        return None
    if env.get(s.env):
        problems.append(f"{s.env}_FILE={path!r}: {s.env} is set too; set only one")
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        problems.append(f"{s.env}_FILE={path!r}: cannot read it ({e.strerror})")
        return None
    if not text:
        problems.append(f"{s.env}_FILE={path!r}: the file is empty")
        return None
    return text


def env_values(table: tuple[Setting, ...], env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """The raw values the environment gives the settings of `table` (secrets also from `<env>_FILE`)."""
    raw = {s.key: env[s.env] for s in table if env.get(s.env, "") != ""}
    for s in table:
        if s.secret and (text := secret_from_file(s, env, problems)) is not None:
            raw[s.key] = text
    return raw


def _consul(env: Mapping[str, str], problems: list[str]) -> ConsulSettings:
    """Consul's own variables, from the environment only (like the consul CLI reads them)."""
    raw = env_values(CONSUL_SETTINGS, env, problems)
    values = {s.key: _parse(s, raw[s.key], s.env, problems) if s.key in raw else s.default
              for s in CONSUL_SETTINGS}
    if env.get("CONSUL_HTTP_TOKEN_FILE") and "token" in raw:
        values["token_source"] = f"CONSUL_HTTP_TOKEN_FILE={env['CONSUL_HTTP_TOKEN_FILE'].strip()}"
    for var, key in (("CONSUL_CACERT", "cacert"), ("CONSUL_CLIENT_CERT", "client_cert"),
                     ("CONSUL_CLIENT_KEY", "client_key")):
        if values[key] and not os.access(values[key], os.R_OK):
            problems.append(f"{var}={values[key]!r}: no readable file there (a PEM file)")
    if bool(values["client_cert"]) != bool(values["client_key"]):
        have, missing = (("CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY") if values["client_cert"]
                         else ("CONSUL_CLIENT_KEY", "CONSUL_CLIENT_CERT"))
        problems.append(f"{have}={env[have]!r}: {missing} is not set; a client certificate needs both")
    consul = ConsulSettings(**values)
    try:
        consul.host_port
    except ValueError:
        problems.append(f"CONSUL_HTTP_ADDR={consul.http_addr!r}: expected host:port or http(s)://host:port")
    return consul


ENGINE_ARGS_LABEL = "engine arguments"  # what problems call the flags after `--` / the container's args


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A problem for every FLEET_* variable that is neither a setting nor one of OTHER_FLEET_VARIABLES."""
    known = sorted(n for n in known_variables() if n.startswith("FLEET_"))
    problems = []
    for name in sorted(n for n in env if n.startswith("FLEET_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]}?" if close
                else "the settings are listed by `sglang-fleet config list` and in docs/configuration.md")
        problems.append(f"{name}: unknown setting; {hint}")
    return problems


def load_config(env: Mapping[str, str] | None = None, *, cluster_only: bool = False,
                engine_args: Sequence[str] = ()) -> FleetConfig:
    """Builds the configuration from preset <- FLEET_CONFIG file <- FLEET_* environment <- engine arguments.

    cluster_only: skip the checks of a node's own engine settings (for `status`, which only reads Consul).
    engine_args: extra launch_server flags from the command line (after `sglang-fleet node --`, or the
    container's arguments), the highest layer of sglang_args.
    """
    return load_config_sources(env, cluster_only=cluster_only, engine_args=engine_args)[0]


def load_config_sources(env: Mapping[str, str] | None = None, *, cluster_only: bool = False,
                        engine_args: Sequence[str] = ()) -> tuple[FleetConfig, dict[str, str]]:
    """load_config(), and where each setting's value came from (key -> "default", "preset <name>",
    "file <path>", "env <VARIABLE>", "command line", or several joined by " + " for merged flags)."""
    env = os.environ if env is None else env
    problems: list[str] = unknown_variables(env)
    layers: list[tuple[str, str, dict]] = []  # (source, problem label prefix, raw values)

    preset_name = (env.get("FLEET_PRESET") or "").strip()
    cfg_file = (env.get("FLEET_CONFIG") or "").strip()
    file_data = _read_yaml(Path(cfg_file), "FLEET_CONFIG", problems) if cfg_file else {}
    preset_name = preset_name or str(file_data.get("preset") or "")
    if preset_name:
        path = find_preset(preset_name)
        if path is None:
            problems.append(f"FLEET_PRESET={preset_name!r}: no such preset; known presets: "
                            f"{', '.join(preset_names()) or '(none found)'}")
        else:
            layers.append((f"preset {preset_name}", f"preset {preset_name}:",
                           _read_yaml(path, f"FLEET_PRESET={preset_name}", problems)))
    if file_data:
        layers.append((f"file {cfg_file}", f"{cfg_file}:", file_data))
    layers.append(("env", "", env_values(SETTINGS, env, problems)))
    if engine_args:
        layers.append(("command line", "", {"sglang_args": shlex.join(engine_args)}))

    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    sources: dict[str, str] = {s.key: "default" for s in SETTINGS + CONSUL_SETTINGS}
    reserved: list[str] = []
    for source, prefix, data in layers:
        for key, raw in data.items():
            setting = SETTING_BY_KEY[key]
            label = (f"{prefix} {key}" if prefix else ENGINE_ARGS_LABEL if source == "command line"
                     else setting.env)
            origin = _env_source(setting, env) if source == "env" else source
            if key in MERGED_KEYS:
                values[key] = _merge_engine_args(values[key], raw, label, problems)
                if key == "sglang_args":
                    flags = [f for f, v in engine_args_layer_safe(raw) if v is not None]
                    reserved += reserved_flag_problems(flags, label)
                sources[key] = origin if sources[key] == "default" else f"{sources[key]} + {origin}"
            else:
                values[key] = _parse(setting, raw, label, problems)
                sources[key] = origin
    values["preset"] = preset_name or None
    if not values["node_name"]:
        values["node_name"] = socket.gethostname().split(".")[0]
        sources["node_name"] = "hostname"
    if not values["group"] and values["nnodes"] == 1:
        values["group"] = values["node_name"]
        sources["group"] = "node name (a one-node group)"
    if values["router_api_key"] is None:  # smg hands the client's key on to the engines: the same one
        values["router_api_key"] = values["engine_api_key"]
        if values["engine_api_key"] is not None:
            sources["router_api_key"] = "FLEET_ENGINE_API_KEY (the engines' key)"

    consul = _consul(env, problems)
    sources.update({s.key: _env_source(s, env) for s in CONSUL_SETTINGS
                    if env.get(s.env) or (s.secret and env.get(s.env + "_FILE"))})
    cfg = FleetConfig(**values, consul=consul)
    if not (cfg.is_router or cluster_only):
        problems.extend(reserved)
    elif engine_args and cfg.is_router:
        problems.append(f"{ENGINE_ARGS_LABEL} {shlex.join(engine_args)!r}: FLEET_ROLE={cfg.role!r} runs no engine "
                        f"(smg's own flags go in FLEET_ROUTER_ARGS)")
    problems.extend(validate(cfg, cluster_only=cluster_only))
    if problems:
        raise ConfigError(problems)
    return cfg, sources


def _env_source(s: Setting, env: Mapping[str, str]) -> str:
    return f"env {s.env}_FILE" if s.secret and env.get(s.env + "_FILE") else f"env {s.env}"


def engine_args_layer_safe(raw: Any) -> tuple[tuple[str, Any], ...]:
    """engine_args_layer(), or nothing where it cannot be parsed (_merge_engine_args reports that)."""
    try:
        return engine_args_layer(raw)
    except ValueError:
        return ()


def validate(cfg: FleetConfig, cluster_only: bool = False) -> list[str]:
    """Cross-field checks (validation.py). Each message names the variable, the value and what is allowed."""
    return validate_config(cfg, cluster_only=cluster_only)


__all__ = [
    "ConfigError", "ConsulSettings", "EX_CONFIG", "FleetConfig", "NODE_ROLES", "ROLES", "SETTINGS",
    "load_config", "load_config_sources", "unknown_variables", "validate", "find_preset", "preset_names", "PER_HOST_ENGINE_FLAGS", "MOE_A2A_BACKENDS",
    "describe_settings", "parse_cpu_list",
    "NAME_RE",  # for nccl_check.py until it imports it from validation.py
]
