"""The real-engine tier: real Consul, real smg, and SGLang 0.5.23's own `python -m sglang.launch_server`
on this machine's Xeon CPU (FLEET_DEVICE=cpu), supervised by `sglang-fleet node` processes on 127.0.0.x
exactly as in production. No sim anywhere in it.

- `sglang_python`: the SGLang CPU venv's python (FLEET_SGLANG_PYTHON, else scripts/install-sglang-cpu).
- `tiny_model`: a seeded random-weights Llama made at test time (tests/sglang/tiny_model.py).
- `supervisor_env`: the real engine's settings, overriding the sim's of tests/conftest.py, so the shared
  `supervisors` fixture and `real_env()` start real engines.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleet_processes import ROOT, make_tiny_model, real_env


@pytest.fixture(scope="session")
def sglang_python() -> str:
    path = os.environ.get("FLEET_SGLANG_PYTHON")
    if not path:
        try:
            out = subprocess.run([str(ROOT / "scripts" / "install-sglang-cpu")], check=True, text=True,
                                 stdout=subprocess.PIPE, timeout=1800).stdout
            path = out.strip().splitlines()[-1]
        except (subprocess.SubprocessError, IndexError, OSError) as exc:
            pytest.fail(f"FLEET_SGLANG_PYTHON is not set and scripts/install-sglang-cpu failed: {exc}")
    probe = subprocess.run([path, "-c", "import sglang.srt.server_args, sgl_kernel"], capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"FLEET_SGLANG_PYTHON={path!r} cannot import SGLang's CPU engine: {probe.stderr[-500:]}")
    return path


@pytest.fixture(scope="session")
def tiny_model(sglang_python, tmp_path_factory) -> Path:
    return make_tiny_model(sglang_python, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def supervisor_env(sglang_python, tiny_model) -> dict[str, str]:
    return real_env(sglang_python, tiny_model)


