"""Conformance tier: argv checked by SGLang 0.5.23's own parser, in its own venv.

FLEET_SGLANG_PYTHON names that venv's python (`scripts/install-sglang-parser` prints it). All argvs
go to ONE subprocess: importing SGLang takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conformance_cases import all_cases

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.conformance)


@pytest.fixture(scope="session")
def sglang_python() -> str:
    py = os.environ.get("FLEET_SGLANG_PYTHON", "")
    if not py:
        pytest.fail("FLEET_SGLANG_PYTHON is not set: run scripts/install-sglang-parser and set "
                    "FLEET_SGLANG_PYTHON to the python it prints (scripts/test does both)", pytrace=False)
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        pytest.fail(f"FLEET_SGLANG_PYTHON={py!r} is not an executable file: run scripts/install-sglang-parser",
                    pytrace=False)
    return py


@pytest.fixture(scope="session")
def parsed(sglang_python):
    """id -> (config, argv, SGLang's parse result) for every case."""
    built = {c.id: c.build() for c in all_cases()}
    payload = json.dumps([{"id": cid, "argv": argv} for cid, (_, argv) in built.items()])
    proc = subprocess.run([sglang_python, str(HERE / "sglang_parse.py")], input=payload, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "default"})
    if proc.returncode:
        pytest.fail(f"sglang_parse.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    results = {r["id"]: r for r in json.loads(proc.stdout)}
    return {cid: (cfg, argv, results[cid]) for cid, (cfg, argv) in built.items()}
