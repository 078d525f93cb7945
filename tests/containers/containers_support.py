"""Container tier helpers, shared by conftest.py and the tests (a unique module name: several test
tiers have a conftest.py).

`Demo` is one running compose/demo.yml project (Consul, a 2-node prefill group, a 1-node decode group,
the router; sim engine) and the small vocabulary the tests speak: `workers()`, `chat()`,
`rank_holder()`, `gen()`, `container(service)`, `wait_serving()`, `serving_ids()`.

The images come from scripts/images (scripts/test runs it; this conftest runs it when one is missing).
testcontainers is told not to start its reaper (its image cannot be pulled here), to talk to the engine
directly and to reach published ports on 127.0.0.1: the tests remove their own containers and networks.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TC_HOST", "127.0.0.1")

import requests  # noqa: E402

import fleet_testing  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FLEET_IMAGE = os.environ.get("FLEET_IMAGE", "sglang-fleet:cpu")
CONSUL_IMAGE = os.environ.get("FLEET_CONSUL_IMAGE", "sglang-fleet/consul:local")
CLUSTER = "demo"  # compose/demo.yml
PREFILL_GROUP, DECODE_GROUP = "demo-prefill", "demo-decode"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """fleet_testing.wait_until, polling every half second (containers answer slowly)."""
    return fleet_testing.wait_until(predicate, timeout, what, interval=every)


def _has_image(client, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except Exception:  # noqa: BLE001
        return False


class Demo:
    """One running compose/demo.yml project."""

    def __init__(self, compose, docker_client, project: str):
        self.compose = compose
        self.docker = docker_client
        self.project = project
        self.network = f"{project}_fleet"
        self.router_url = f"http://127.0.0.1:{compose.get_service_port('router', 8000)}"
        self._admin_key = ""
        self.consul_url = f"http://127.0.0.1:{compose.get_service_port('consul', 8500)}"

    # ---- containers ---------------------------------------------------------------------------------
    def container(self, service: str):
        return self.docker.containers.get(f"{self.project}-{service}-1")

    def logs(self, service: str, tail: int = 60) -> str:
        return self.container(service).logs(tail=tail, timestamps=True).decode(errors="replace")

    def project_containers(self) -> list:
        """Every container of this compose project, stopped ones too (and ones a test started by hand
        under the project's name, e.g. the crashing node)."""
        by_label = self.docker.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={self.project}"})
        by_name = self.docker.containers.list(all=True, filters={"name": f"{self.project}-"})
        seen, out = set(), []
        for c in by_label + by_name:
            if c.id not in seen:
                seen.add(c.id)
                out.append(c)
        return sorted(out, key=lambda c: c.name)

    def dump_logs(self, tail: int = 400) -> str:
        """Every container's logs, one section each (node, router, Consul), for a failed test. smg's
        per-request lines are dropped so the nodes' and the router agent's own lines stay visible."""
        noise = ("processing request", "No available workers", '"Step started"', '"Step succeeded"')
        sections = []
        for c in self.project_containers():
            try:
                c.reload()
                state = c.attrs.get("State", {})
                raw = c.logs(timestamps=True).decode(errors="replace").splitlines()
            except Exception as exc:  # noqa: BLE001 - a dump must not hide the failure it explains
                sections.append(f"===== {c.name}: logs unavailable ({exc!r})")
                continue
            lines = [ln for ln in raw if not any(n in ln for n in noise)]
            dropped = len(lines) - tail
            status = f"{state.get('Status')}, exit code {state.get('ExitCode')}"
            head = f"===== {c.name} ({status}; {len(raw)} lines" + (
                f", the first {dropped} not shown" if dropped > 0 else "") + ")"
            sections.append("\n".join([head] + lines[-tail:]))
        return "\n".join(sections)

    def exec_python(self, service: str, code: str) -> str:
        result = self.container(service).exec_run(["python", "-c", code])
        assert result.exit_code == 0, result.output.decode(errors="replace")
        return result.output.decode()

    # ---- router -------------------------------------------------------------------------------------
    def workers(self) -> list[dict]:
        """smg's worker list, with the admin key the router agent keeps in its container (a new one after
        every start of the agent: read again on 401)."""
        for fresh in (False, True):
            if fresh or not self._admin_key:
                self._admin_key = self.exec_python("router", "from sglang_fleet.smg_client import read_admin_key; "
                                                   "print(read_admin_key(8000) or '')").strip()
            r = requests.get(f"{self.router_url}/workers", timeout=5,
                             headers={"Authorization": f"Bearer {self._admin_key}"})
            if r.status_code != 401:
                break
        r.raise_for_status()
        return [w for w in r.json().get("workers", []) if w.get("status") != "draining"]

    def worker_types(self) -> list[str]:
        return sorted(w.get("worker_type", "?") for w in self.workers())

    def chat(self, content: str = "hello fleet", max_tokens: int = 8, timeout: float = 60) -> dict:
        r = requests.post(f"{self.router_url}/v1/chat/completions", timeout=timeout, json={
            "model": "sim/demo-model", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]})
        r.raise_for_status()
        return r.json()

    def wait_serving(self, timeout: float = 120) -> dict:
        """The router lists a prefill and a decode worker and a chat completion through it succeeds."""
        wait_until(lambda: {"prefill", "decode"} <= set(self.worker_types()), timeout,
                   "the router to list a prefill and a decode worker")
        return wait_until(self.chat, 30, "a chat completion through the router")

    # ---- consul -------------------------------------------------------------------------------------
    def kv(self, key: str) -> str | None:
        r = requests.get(f"{self.consul_url}/v1/kv/{key}", timeout=5)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        value = r.json()[0].get("Value")
        return base64.b64decode(value).decode() if value else ""

    def gen(self, group: str) -> int | None:
        value = self.kv(f"sglang-fleet/{CLUSTER}/groups/{group}/gen")
        return None if value is None else int(value)

    def rank_holder(self, group: str, rank: int) -> str | None:
        """The node name holding `rank` in the group's current generation."""
        g = self.gen(group)
        raw = None if g is None else self.kv(f"sglang-fleet/{CLUSTER}/groups/{group}/g{g}/ranks/{rank}")
        return json.loads(raw)["node"] if raw else None

    def serving_ids(self, passing: bool = True) -> set[str]:
        r = requests.get(f"{self.consul_url}/v1/health/service/sglang", timeout=5,
                         params={"passing": "1"} if passing else {})
        r.raise_for_status()
        return {e["Service"]["ID"] for e in r.json()}

    @staticmethod
    def serving_id(group: str) -> str:
        return f"sglang-{CLUSTER}-{group}"


