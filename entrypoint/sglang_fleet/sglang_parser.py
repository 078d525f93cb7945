"""The engine's command line checked by SGLang's own parser before anything starts (`plan`, `node`).

An unknown flag (a typo in FLEET_SGLANG_ARGS or the container's arguments) would otherwise surface only when
launch_server exits, once per restart, burning the failure budget. The parser is SGLang's argparse
(`ServerArgs.add_cli_args`, with its `--config` YAML merged first), built the way
`sglang.srt.server_args.prepare_server_args` builds it, in a subprocess: importing SGLang pulls in torch,
which the supervisor has no use for. The interpreter is FLEET_ENGINE_PYTHON (the one that runs
launch_server), else the supervisor's own where that has SGLang; with neither the check is skipped with a
note (the sim engine is not SGLang and is never checked).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import yaml

from sglang_fleet.config import FleetConfig
from sglang_fleet.launch import EngineLaunch

NOT_IMPORTABLE = 3  # the checker's exit status when SGLang cannot be imported
TIMEOUT = 180.0  # importing SGLang takes seconds, tens on a busy host
CHECKER = """import argparse, sys
try:
    from sglang.srt.server_args import ServerArgs
except ImportError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    raise SystemExit(3)
argv = sys.argv[1:]
parser = argparse.ArgumentParser(prog="sglang.launch_server")
ServerArgs.add_cli_args(parser)
if "--config" in argv:  # as prepare_server_args does
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger
    argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
parser.parse_args(argv)
"""


@dataclass(frozen=True)
class ParserVerdict:
    error: str | None = None  # SGLang's own message: the flags are wrong
    note: str | None = None  # why nothing was checked, or which parser checked


def _candidates(cfg: FleetConfig) -> list[str]:
    pythons = [cfg.engine_python]
    spec = importlib.util.find_spec("sglang")
    if spec is not None and spec.origin is not None and sys.executable != cfg.engine_python:  # not a bare dir
        pythons.append(sys.executable)
    return pythons


def check_launch(cfg: FleetConfig, launch: EngineLaunch) -> ParserVerdict:
    """The launch's flags through SGLang's parser. Its API-key --config file is written only when the engine
    starts: the parser reads a stand-in with the same flags and placeholder keys."""
    flags = launch.argv[3:]
    if launch.secret_file is None:
        return check_flags(cfg, flags)
    path, text = launch.secret_file
    placeholders = yaml.safe_dump({flag: "checked" for flag in yaml.safe_load(text)})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as stand_in:
        stand_in.write(placeholders)
        stand_in.flush()
        return check_flags(cfg, [stand_in.name if arg == str(path) else arg for arg in flags])


def check_flags(cfg: FleetConfig, flags: list[str]) -> ParserVerdict:
    """`flags` (launch_server's arguments, without the interpreter) through SGLang's parser."""
    if cfg.engine != "sglang":
        return ParserVerdict()
    tried = []
    for python in _candidates(cfg):
        try:
            proc = subprocess.run([python, "-c", CHECKER, *flags], capture_output=True, text=True, timeout=TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{python}: {e}")
            continue
        if proc.returncode == 0:
            return ParserVerdict(note=f"engine flags checked by SGLang's parser in {python}")
        if proc.returncode == NOT_IMPORTABLE:
            tried.append(f"{python}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no SGLang'}")
            continue
        said = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        message = said[-1] if said else f"exit {proc.returncode}"
        return ParserVerdict(error=f"engine flags: SGLang's parser ({python}) rejects them: {message}")
    return ParserVerdict(note="engine flags not checked by SGLang's parser: no Python with SGLang "
                         f"({'; '.join(tried)}); set FLEET_ENGINE_PYTHON to the one that has it")


__all__ = ["ParserVerdict", "check_flags", "check_launch"]
