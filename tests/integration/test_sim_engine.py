"""The sim engine as real processes on loopback: group handshake, NCCL-like abort, and requests through
the real router (smg), in prefill/decode and in regular mode, with the `openai` client."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fleet_testing
from fleet_testing import wait_until

pytestmark = pytest.mark.integration

BIN_DIR = Path(sys.executable).parent
FLEET_BIN = str(BIN_DIR / "sglang-fleet")
SIM_PREFIX = "[sglang-fleet sim engine]"
MODEL = "sim/tiny-model"


def free_port() -> int:
    return fleet_testing.free_port("0.0.0.0")  # free on every address: the sim may bind 0.0.0.0


def http(method: str, url: str, body=None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str):
    status, raw = http("GET", url)
    assert status == 200, (url, status, raw[:300])
    return json.loads(raw)


def health(url: str) -> int:
    try:
        return http("GET", url + "/health", timeout=2)[0]
    except OSError:
        return 0


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def exited(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.log.name} still running after {timeout:g} s:\n{self.text[-2000:]}") from None


class Procs:
    """Starts sim engines (and smg) as their own process groups; kills every group at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.all: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Proc:
        p = Proc(argv, self.tmp / f"{name}.log", env)
        self.all.append(p)
        return p

    def sim(self, name: str, addr: str, port: int, *flags: str, env: dict | None = None) -> Proc:
        return self.start(name, [FLEET_BIN, "sim-engine", "--model-path", MODEL, "--host", addr,
                                 "--port", str(port), "--mem-fraction-static", "0.8", *flags], env)

    def group(self, name: str, addrs: list[str], *flags: str, env: dict | None = None) -> tuple[list[Proc], list[str]]:
        """One sim group: rank r on addrs[r]; returns the processes and each rank's http URL."""
        dist = f"{addrs[0]}:{free_port()}"
        procs, urls = [], []
        for rank, addr in enumerate(addrs):
            port = free_port()
            procs.append(self.sim(f"{name}-r{rank}", addr, port, "--nnodes", str(len(addrs)), "--node-rank",
                                  str(rank), "--dist-init-addr", dist, *flags, env=env))
            urls.append(f"http://{addr}:{port}")
        return procs, urls

    def cleanup(self) -> None:
        for p in self.all:
            p.signal(signal.SIGKILL)
        for p in self.all:
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    yield ps
    ps.cleanup()


def smg_binary() -> str:
    path = os.environ.get("FLEET_SMG_BIN") or str(BIN_DIR / "smg")
    if not Path(path).exists():
        pytest.fail(f"smg not found at {path} (set FLEET_SMG_BIN)")
    return path


def start_smg(procs: Procs, *mode: str) -> str:
    port = free_port()
    procs.start("smg", [smg_binary(), "launch", *mode, "--host", "127.0.0.1", "--port", str(port),
                        "--prometheus-port", str(free_port()), "--log-level", "warn"])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", url + "/workers")[0] == 200, 30, "smg to answer")
    return url


def add_worker(smg: str, body: dict) -> None:
    status, raw = http("POST", smg + "/workers", body)
    assert status in (200, 202), raw
    wait_until(lambda: any(w["url"] == body["url"] and w["status"] == "ready" and w["is_healthy"]
                           for w in get_json(smg + "/workers")["workers"]), 30, f"smg to list {body['url']} ready")


# ---- the group ----------------------------------------------------------------------------------------

def test_two_ranks_handshake_then_ready(procs):
    (r0, r1), (url0, url1) = procs.group("g", ["127.0.0.41", "127.0.0.42"],
                                         env={"SGLANG_FLEET_SIM_STARTUP_DELAY": "0.5"})
    # rank 0 serves, but says 503 until its group is formed and loaded
    wait_until(lambda: health(url0) in (200, 503), 20, "rank 0 to listen")
    wait_until(lambda: health(url0) == 200, 20, "rank 0 healthy")
    wait_until(lambda: health(url1) == 200, 20, "rank 1's dummy health server")
    info = get_json(url0 + "/server_info")
    assert info["sim"] is True and info["nnodes"] == 2 and info["ready"] is True
    assert "sim engine: CPU stand-in for sglang.launch_server, not a model" in r0.text
    assert "joined the group" in r1.text and "--mem-fraction-static" in r0.text  # accepted and ignored
    assert http("GET", url1 + "/server_info")[0] == 404  # ranks > 0: only the dummy health server
    out = json.loads(http("POST", url0 + "/generate", {"text": "hello group"})[1])
    assert out["text"].startswith(SIM_PREFIX) and out["meta_info"]["sim"] is True


def test_rank0_is_503_until_the_group_forms(procs):
    dist = f"127.0.0.43:{free_port()}"
    port0 = free_port()
    r0 = procs.sim("r0", "127.0.0.43", port0, "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", dist)
    url0 = f"http://127.0.0.43:{port0}"
    wait_until(lambda: health(url0) == 503, 20, "rank 0 to answer 503 while alone")
    assert http("POST", url0 + "/generate", {"text": "x"})[0] == 503
    procs.sim("r1", "127.0.0.44", free_port(), "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", dist)
    wait_until(lambda: health(url0) == 200, 20, "rank 0 healthy once rank 1 joined")
    assert r0.exited() is None


def test_duplicate_and_mismatched_ranks_are_rejected(procs):
    (r0, r1), (url0, _) = procs.group("g", ["127.0.0.45", "127.0.0.46"])
    wait_until(lambda: health(url0) == 200, 20, "group ready")
    dist = r0.proc.args[r0.proc.args.index("--dist-init-addr") + 1]
    dup = procs.sim("dup", "127.0.0.47", free_port(), "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", dist)
    assert dup.wait_exit(15) != 0
    assert "rank 1 is already held" in dup.text
    other = procs.sim("other", "127.0.0.47", free_port(), "--nnodes", "3", "--node-rank", "2",
                      "--dist-init-addr", dist)
    assert other.wait_exit(15) != 0
    assert "--nnodes 3 differs from rank 0's --nnodes 2" in other.text
    # the formed group is not disturbed by the rejected ones
    assert health(url0) == 200 and r0.exited() is None and r1.exited() is None


@pytest.mark.parametrize("victim", [0, 1])
def test_kill9_of_any_rank_ends_every_rank(procs, victim):
    ranks, urls = procs.group("g", ["127.0.0.51", "127.0.0.52", "127.0.0.53"])
    for url in urls:
        wait_until(lambda: health(url) == 200, 20, f"{url} ready")
    ranks[victim].signal(signal.SIGKILL)
    for rank, p in enumerate(ranks):
        if rank != victim:
            assert p.wait_exit(10) == 1, p.text[-1500:]
            assert "aborting as NCCL would" in p.text


def test_silent_peer_ends_every_rank(procs):
    ranks, urls = procs.group("g", ["127.0.0.54", "127.0.0.55", "127.0.0.56"])
    for url in urls:
        wait_until(lambda: health(url) == 200, 20, f"{url} ready")
    ranks[1].signal(signal.SIGSTOP)  # alive but silent: only the heartbeat timeout can tell
    assert ranks[0].wait_exit(10) == 1
    assert ranks[2].wait_exit(10) == 1
    assert "no message for" in ranks[0].text


def test_crash_knob_bad_argv_and_sigterm(procs):
    crash = procs.sim("crash", "127.0.0.57", free_port(), env={"SGLANG_FLEET_SIM_CRASH_AT_START": "1"})
    assert crash.wait_exit(15) == 1 and "SGLANG_FLEET_SIM_CRASH_AT_START" in crash.text
    bad = procs.sim("bad", "127.0.0.57", free_port(), "--nnodes", "2", "--node-rank", "2")
    assert bad.wait_exit(15) == 78 and "--node-rank 2 is out of range" in bad.text
    port = free_port()
    solo = procs.sim("solo", "127.0.0.57", port)
    wait_until(lambda: health(f"http://127.0.0.57:{port}") == 200, 20, "solo ready")
    solo.proc.send_signal(signal.SIGTERM)
    assert solo.wait_exit(10) == 0
    # Like SGLang's rank 0: SIGTERM drains what is in flight, then exits (tokenizer_manager.sigterm_watchdog).
    assert solo.text.index("Draining requests") < solo.text.index("Gracefully exiting... Remaining number of requests 0")


# ---- through the real router --------------------------------------------------------------------------

def test_prefill_decode_through_real_smg(procs):
    import openai

    boot = free_port()
    _, (prefill_url, prefill_r1) = procs.group("prefill", ["127.0.0.61", "127.0.0.62"], "--disaggregation-mode",
                                               "prefill", "--disaggregation-bootstrap-port", str(boot))
    decode_port = free_port()
    procs.sim("decode", "127.0.0.63", decode_port, "--disaggregation-mode", "decode")
    decode_url = f"http://127.0.0.63:{decode_port}"
    for url in (prefill_url, prefill_r1, decode_url):
        wait_until(lambda: health(url) == 200, 20, f"{url} ready")
    smg = start_smg(procs, "--pd-disaggregation")
    add_worker(smg, {"url": prefill_url, "worker_type": "prefill", "bootstrap_port": boot})
    add_worker(smg, {"url": decode_url, "worker_type": "decode"})
    kv_from = f"127.0.0.61:{boot}"

    out = json.loads(http("POST", smg + "/generate", {"text": "the prompt", "sampling_params": {"max_new_tokens": 4}})[1])
    assert out["text"] == f"{SIM_PREFIX} the prompt"
    assert out["meta_info"]["kv_from"] == kv_from and isinstance(out["meta_info"]["bootstrap_room"], int)

    status, raw = http("POST", smg + "/generate", {"text": "streamed prompt", "stream": True})
    events = [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]"
    assert json.loads(events[-2])["text"] == f"{SIM_PREFIX} streamed prompt"
    assert json.loads(events[-2])["meta_info"]["kv_from"] == kv_from

    client = openai.OpenAI(base_url=smg + "/v1", api_key="unused", max_retries=0, timeout=30)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}])
    assert chat.choices[0].message.content == f"{SIM_PREFIX} hi there"
    assert chat.model_extra["sim_meta"]["kv_from"] == kv_from
    stream = client.chat.completions.create(model=MODEL, stream=True,
                                            messages=[{"role": "user", "content": "stream me"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == f"{SIM_PREFIX} stream me"

    for url in (prefill_url, decode_url):  # 4 rooms handed over, counted on both sides
        assert get_json(url + "/server_info")["kv_transfers"] == 4
    # a decode request without the router's bootstrap fields is refused, not faked
    assert http("POST", decode_url + "/generate", {"text": "direct"})[0] == 400


def test_regular_mode_openai_client_through_real_smg(procs):
    import openai

    urls = []
    for i, addr in enumerate(("127.0.0.64", "127.0.0.65")):
        port = free_port()
        procs.sim(f"regular{i}", addr, port)
        urls.append(f"http://{addr}:{port}")
    for url in urls:
        wait_until(lambda: health(url) == 200, 20, f"{url} ready")
    smg = start_smg(procs, "--policy", "round_robin")
    for url in urls:
        add_worker(smg, {"url": url, "worker_type": "regular"})

    client = openai.OpenAI(base_url=smg + "/v1", api_key="unused", max_retries=0, timeout=30)
    for _ in range(2):
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8)
        assert chat.choices[0].message.content == f"{SIM_PREFIX} hello" and chat.model_extra["sim"] is True
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one two"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"{SIM_PREFIX} one two"
    assert chunks[-1].usage.completion_tokens == 3
    comp = client.completions.create(model=MODEL, prompt="complete this", max_tokens=2)
    assert comp.choices[0].text == f"{SIM_PREFIX} complete" and comp.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="a b", stream=True))
    assert text == f"{SIM_PREFIX} a b"
    served = [get_json(url + "/server_info")["requests"] for url in urls]
    assert all(n > 0 for n in served), served  # round robin reached both
