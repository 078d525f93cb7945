"""The engine process: real child processes and a real HTTP server on 127.0.0.1, no fakes of the OS."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fleet_testing import free_port, process_alive as alive, wait_until
from sglang_fleet.config import FleetConfig
from sglang_fleet.engine import Engine, EngineState

# A stand-in for sglang.launch_server: prints a line to each stream, then behaves as told.
FAKE_ENGINE = textwrap.dedent('''
    import argparse, http.server, os, signal, subprocess, sys, time
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--ready-file")       # /health says 503 until this file exists
    ap.add_argument("--sick-file")        # /health says 500 once this file exists
    ap.add_argument("--exit-code", type=int)
    ap.add_argument("--count-file")       # one line per start
    ap.add_argument("--fail-first", type=int, default=0)  # exit 1 on the first N starts
    ap.add_argument("--grandchild-file")  # spawn a sleeping grandchild, write its pid here
    ap.add_argument("--ignore-term-file") # ignore SIGTERM, then create this file
    ap.add_argument("--shm-file")         # create and map a /dev/shm file, as SGLang's CPU all-reduce does
    ap.add_argument("--graceful-file")    # like SGLang's rank 0: on SIGTERM note whether the grandchild
                                          # still lives, stop it, exit 0
    ap.add_argument("--config")           # like SGLang: read it while parsing, log what it held
    a = ap.parse_args()
    if a.config:
        print("server_args=" + open(a.config).read().replace("\\n", " "), flush=True)
    starts = 0
    if a.count_file:
        with open(a.count_file, "a") as f:
            f.write("start\\n")
        starts = len(open(a.count_file).read().split())
    if a.shm_file:
        import mmap
        fd = os.open(a.shm_file, os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        shm_map = mmap.mmap(fd, 4096)
        os.close(fd)
    print("hello stdout", flush=True)
    print("hello stderr", file=sys.stderr, flush=True)
    if a.exit_code is not None:
        sys.exit(a.exit_code)
    if starts and starts <= a.fail_first:
        sys.exit(1)
    if a.ignore_term_file:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(a.ignore_term_file, "w").close()
    if a.grandchild_file:
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        if a.graceful_file:  # installed before the pid file says we are up
            def graceful(*_):
                with open(a.graceful_file, "w") as f:
                    f.write(f"grandchild alive at SIGTERM: {gc.poll() is None}")
                gc.kill()
                gc.wait()
                sys.exit(0)
            signal.signal(signal.SIGTERM, graceful)
        with open(a.grandchild_file + ".tmp", "w") as f:
            f.write(str(gc.pid))
        os.rename(a.grandchild_file + ".tmp", a.grandchild_file)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                code = 404
            elif a.sick_file and os.path.exists(a.sick_file):
                code = 500
            elif a.ready_file and not os.path.exists(a.ready_file):
                code = 503
            else:
                code = 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    if a.serve:
        http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Health).serve_forever()
    while True:
        time.sleep(3600)
''')


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    secret_file: tuple[Path, str] | None = None
    secrets: tuple[str, ...] = ()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def fake(tmp_path: Path, port: int):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)

    def make(*args: str) -> Launch:
        return Launch([sys.executable, str(script), "--port", str(port), *args])
    return make


@pytest.fixture
def engines():
    made: list[Engine] = []
    yield made
    for e in made:  # never leave a child behind, even when a test fails
        e.stop(grace=0.5)


@pytest.fixture
def new_engine(port: int, engines):
    def make(rank: int = 0, **kw) -> Engine:
        settings = dict(ready_timeout=15.0, stop_grace=5.0, probe_interval=0.05, probe_timeout=2.0, health_interval=0.1,
                        health_failures=3, context={"group": "g1", "generation": 7})
        settings.update(kw)
        engine = Engine(f"http://127.0.0.1:{port}/health", rank, **settings)
        engines.append(engine)
        return engine
    return make


def wait_ready(engine: Engine, deadline: float | None = None) -> EngineState:
    """Polls like the node loop does, while the engine is STARTING (until `deadline`, monotonic)."""
    while engine.poll() is EngineState.STARTING:
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return engine.state


def eventually(check, timeout: float = 10.0):
    return wait_until(check, timeout, "condition", interval=0.05)


def test_rank0_is_ready_only_when_health_answers_200(new_engine, fake, tmp_path):
    ready = tmp_path / "ready"
    engine = new_engine(rank=0)
    sentence = engine.start(fake("--serve", "--ready-file", str(ready)))
    assert sentence == f"engine started pid {engine.pid}"
    assert engine.poll() is EngineState.STARTING
    # The server answers, but with 503: not ready.
    assert wait_ready(engine, deadline=time.monotonic() + 1.0) is EngineState.STARTING
    ready.touch()
    assert wait_ready(engine, deadline=time.monotonic() + 10) is EngineState.RUNNING
    assert engine.reason.startswith("engine ready after ")

    os.kill(engine.pid, signal.SIGKILL)
    eventually(lambda: engine.poll() is EngineState.EXITED)
    assert engine.reason == "engine exited with code -9 while running"
    assert engine.failed and engine.returncode == -9
    assert engine.stop().startswith("engine stopped")
    assert engine.state is EngineState.STOPPED


def test_rank_above_zero_is_ready_when_alive_and_dummy_health_answers(new_engine, fake):
    engine = new_engine(rank=1)
    engine.start(fake("--serve"))
    assert wait_ready(engine, deadline=time.monotonic() + 10) is EngineState.RUNNING
    pid = engine.pid
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: engine.poll() is EngineState.EXITED)
    assert engine.reason == "engine exited with code -9 while running"
    engine.stop()
    assert not alive(pid)


def test_engine_not_ready_in_time_is_unhealthy(new_engine, fake):
    engine = new_engine(rank=0, ready_timeout=1.0)
    engine.start(fake())  # alive, but nothing listens on the port
    pid = engine.pid
    assert wait_ready(engine) is EngineState.UNHEALTHY
    assert engine.reason.startswith("engine not ready after 1 s (last probe: ")
    assert engine.failed and alive(pid)
    engine.stop()
    assert engine.state is EngineState.STOPPED and not alive(pid)


def test_running_engine_whose_health_keeps_failing_is_stuck(new_engine, fake, tmp_path):
    sick = tmp_path / "sick"
    engine = new_engine(rank=0)
    engine.start(fake("--serve", "--sick-file", str(sick)))
    assert wait_ready(engine, deadline=time.monotonic() + 10) is EngineState.RUNNING
    sick.touch()
    eventually(lambda: engine.poll() is EngineState.UNHEALTHY)
    assert engine.reason == "engine stuck: /health failed 3 times (last: HTTP 500)"


def test_stop_kills_the_whole_process_group_including_grandchild(new_engine, fake, tmp_path):
    gc_file = tmp_path / "grandchild"
    engine = new_engine()
    engine.start(fake("--grandchild-file", str(gc_file)))
    grandchild = int(eventually(lambda: gc_file.exists() and gc_file.read_text()))
    child = engine.pid
    assert alive(child) and alive(grandchild)
    sentence = engine.stop(grace=5)
    assert "after SIGTERM" in sentence and "(exit code -15)" in sentence
    assert engine.state is EngineState.STOPPED
    assert not alive(child) and not alive(grandchild)


def test_rank0_stop_lets_launch_server_stop_its_own_children(new_engine, fake, tmp_path):
    """SGLang's graceful exit needs SIGTERM at launch_server alone: its scheduler must still be there while
    it drains (a SIGTERM reaching the scheduler directly makes SGLang abort its whole tree)."""
    gc_file, graceful = tmp_path / "grandchild", tmp_path / "graceful"
    engine = new_engine(rank=0)
    engine.start(fake("--grandchild-file", str(gc_file), "--graceful-file", str(graceful)))
    grandchild = int(eventually(lambda: gc_file.exists() and gc_file.read_text()))
    sentence = engine.stop(grace=5)
    assert graceful.read_text() == "grandchild alive at SIGTERM: True"
    assert "SIGTERM to launch_server" in engine.history[-2][1]
    assert "after SIGTERM" in sentence and "(exit code 0)" in sentence
    assert not alive(grandchild)


def test_rank1_stop_signals_the_whole_group(new_engine, fake, tmp_path):
    """launch_server of a rank > 0 ignores SIGTERM (it waits for rank 0's ShutdownReq): the group gets it."""
    gc_file, ignoring = tmp_path / "grandchild", tmp_path / "ignoring"
    engine = new_engine(rank=1)
    engine.start(fake("--grandchild-file", str(gc_file), "--ignore-term-file", str(ignoring)))
    grandchild = int(eventually(lambda: gc_file.exists() and gc_file.read_text()))
    sentence = engine.stop(grace=1)
    assert "SIGTERM to its process group" in engine.history[-2][1]
    assert "with SIGKILL after 1 s grace" in sentence
    assert not alive(grandchild)


def test_shm_files_the_engine_left_are_removed_after_it_was_killed(new_engine, fake, tmp_path):
    """SGLang on CPU maps a 258 MB /dev/shm all-reduce buffer per start and never unlinks it when killed."""
    shm = Path("/dev/shm") / f"sglang-fleet-test-{os.getpid()}-{tmp_path.name}"
    other = Path("/dev/shm") / f"sglang-fleet-test-other-{os.getpid()}-{tmp_path.name}"
    other.write_bytes(b"not the engine's")
    try:
        engine = new_engine()
        engine.start(fake("--serve", "--shm-file", str(shm)))
        eventually(lambda: engine.poll() is EngineState.RUNNING)
        eventually(lambda: str(shm) in engine.shm_files, timeout=10)
        os.kill(engine.pid, signal.SIGKILL)  # a crash: nothing of the engine unlinks anything
        eventually(lambda: engine.poll() is EngineState.EXITED)
        assert shm.exists()
        sentence = engine.stop()
        assert "removed 1 file(s) it left in /dev/shm" in sentence
        assert not shm.exists() and other.exists()  # another engine's file on a shared /dev/shm stays
    finally:
        for p in (shm, other):
            p.unlink(missing_ok=True)


def test_stop_sends_sigkill_after_grace_to_an_engine_ignoring_sigterm(new_engine, fake, tmp_path):
    ignoring = tmp_path / "ignoring"
    gc_file = tmp_path / "grandchild"
    engine = new_engine()
    engine.start(fake("--ignore-term-file", str(ignoring), "--grandchild-file", str(gc_file)))
    eventually(gc_file.exists)
    grandchild = int(gc_file.read_text())
    child = engine.pid
    sentence = engine.stop(grace=0.5)
    assert "with SIGKILL after 0.5 s grace" in sentence and "(exit code -9)" in sentence
    assert engine.returncode == -9
    assert [s for s, _ in engine.history[-2:]] == [EngineState.STOPPING, EngineState.STOPPED]
    assert not alive(child) and not alive(grandchild)


def test_stop_without_waiting_is_finished_by_poll(new_engine, fake, tmp_path):
    """The node loop may stop an engine and go on with its cycles: poll() escalates and reaps."""
    ignoring, gc_file = tmp_path / "ignoring", tmp_path / "grandchild"
    engine = new_engine(rank=1)
    engine.start(fake("--ignore-term-file", str(ignoring), "--grandchild-file", str(gc_file)))
    grandchild = int(eventually(lambda: gc_file.exists() and ignoring.exists() and gc_file.read_text()))
    pid = engine.pid
    assert engine.stop(grace=0.5, wait=False) == (f"stopping engine pid {pid}: SIGTERM to its process group, "
                                                  f"0.5 s grace")
    assert engine.state is EngineState.STOPPING and alive(pid)
    eventually(lambda: engine.poll() is EngineState.STOPPED)
    assert "with SIGKILL after 0.5 s grace" in engine.reason
    assert not alive(pid) and not alive(grandchild)


def test_a_failed_start_backs_off_and_poll_starts_it_again(new_engine, fake, tmp_path):
    count = tmp_path / "count"
    engine = new_engine(rank=0, max_starts=2)
    engine.start(fake("--serve", "--count-file", str(count), "--fail-first", "1"))
    eventually(lambda: engine.poll() is EngineState.EXITED)
    engine.retry_later(0.1)
    eventually(lambda: engine.poll() is EngineState.RUNNING)  # the same launch, started again by poll()
    assert count.read_text().split() == ["start", "start"]
    assert [s for s, _ in engine.history] == [EngineState.STARTING, EngineState.EXITED, EngineState.STOPPING,
                                              EngineState.BACKOFF, EngineState.STARTING, EngineState.RUNNING]
    assert engine.history[3][1].endswith("starting again in 0.1 s (start 2/2)")


def test_a_failed_start_with_the_starts_spent_is_fatal(new_engine, fake):
    engine = new_engine(rank=0, max_starts=1)
    engine.start(fake("--exit-code", "1"))
    eventually(lambda: engine.poll() is EngineState.EXITED)
    engine.retry_later(0.1)
    eventually(lambda: engine.poll() is EngineState.FATAL)
    assert engine.reason.startswith("engine exited with code 1 before ready; engine stopped after SIGTERM")
    assert engine.reason.endswith("1 start(s) in a row failed, giving up") and engine.failed


def test_stop_is_idempotent(new_engine, fake):
    engine = new_engine()
    assert engine.stop() == "engine not started"
    engine.start(fake())
    first = engine.stop(grace=2)
    assert engine.stop(grace=2) == first
    assert engine.state is EngineState.STOPPED


def test_output_lines_become_log_events_with_context(new_engine, fake):
    engine = new_engine(rank=2)
    with capture_logs() as events:
        engine.start(fake("--exit-code", "0"))
        eventually(lambda: engine.poll() is EngineState.EXITED)
        engine.stop()
    output = [e for e in events if e["event"] == "engine_output"]
    want = {("stdout", "hello stdout"), ("stderr", "hello stderr")}
    assert {(e["stream"], e["line"]) for e in output} == want
    assert all(e["rank"] == 2 and e["group"] == "g1" and e["generation"] == 7 for e in output)
    sentences = [e["event"] for e in events if "state" in e]
    assert sentences[0] == f"engine started pid {engine.history[0][1].split()[-1]}"
    assert "engine exited with code 0 before ready" in sentences


def test_the_key_file_lives_only_while_the_engine_starts_and_the_key_never_reaches_the_log(new_engine, fake,
                                                                                          tmp_path):
    ready, keys = tmp_path / "ready", tmp_path / "keys.yaml"
    engine = new_engine(rank=0, api_key="k-123")
    launch = fake("--serve", "--ready-file", str(ready), "--config", str(keys))
    launch.secret_file, launch.secrets = (keys, "api-key: k-123\n"), ("k-123",)
    with capture_logs() as events:
        engine.start(launch)
        assert keys.stat().st_mode & 0o777 == 0o600
        eventually(lambda: any(e["event"] == "engine_output" for e in events))
        assert engine.poll() is EngineState.STARTING and keys.exists()
        ready.touch()
        assert wait_ready(engine, deadline=time.monotonic() + 10) is EngineState.RUNNING
        assert not keys.exists()  # read while the arguments were parsed; not left on disk
        engine.stop()
    lines = [e["line"] for e in events if e["event"] == "engine_output"]
    assert "server_args=api-key: *** " in lines
    assert "k-123" not in repr(events)


def test_missing_executable_is_a_failed_start(new_engine):
    engine = new_engine()
    missing = Launch(["/nonexistent/python", "-m", "sglang.launch_server"])
    assert engine.start(missing).startswith("engine could not be started: ")
    assert engine.poll() is EngineState.EXITED
    assert engine.failed


def test_from_config_takes_the_supervision_settings():
    cfg = FleetConfig(http_port=31000, ready_timeout=60.0, stop_grace=3.0)
    engine = Engine.from_config(cfg, 1, group="g", generation=3)
    assert engine.health_url == "http://127.0.0.1:31000/health"
    assert (engine.ready_timeout, engine.stop_grace, engine.child.max_starts) == (60.0, 3.0, cfg.start_attempts)
    assert engine.context == {"rank": 1, "group": "g", "generation": 3}


# A supervisor in miniature: starts the fake engine through Engine.start, writes its pid, then waits.
PARENT = textwrap.dedent('''
    import sys, time
    from dataclasses import dataclass
    from sglang_fleet.engine import Engine

    @dataclass
    class Launch:
        argv: list
        env: dict

    script, port, pid_file = sys.argv[1], sys.argv[2], sys.argv[3]
    import os
    engine = Engine(f"http://127.0.0.1:{port}/health", 1)
    engine.start(Launch([sys.executable, script, "--port", port], dict(os.environ)))
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(engine.pid))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(120)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_engine_dies_with_a_kill9ed_supervisor(fake, tmp_path, port):
    """kill -9 of the supervisor leaves no engine behind (PR_SET_PDEATHSIG=SIGKILL), although the engine
    runs in its own session, out of reach of a signal to the supervisor's process group."""
    fake()  # writes the fake engine script
    pid_file = tmp_path / "engine.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "fake_engine.py"), str(port),
                               str(pid_file)], stdin=subprocess.DEVNULL)
    try:
        engine_pid = int(eventually(lambda: pid_file.exists() and pid_file.read_text(), timeout=20))
        assert alive(engine_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        eventually(lambda: not alive(engine_pid))
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_pdeathsig_follows_the_spawning_thread(new_engine, fake):
    """Why Engine.start must only be called from the long-lived node-loop thread: the kernel sends the
    death signal when the *thread* that forked ends, even though the process lives on."""
    engine = new_engine(rank=1)
    spawner = threading.Thread(target=engine.start, args=(fake(),))
    spawner.start()
    spawner.join()
    eventually(lambda: engine.poll() is EngineState.EXITED)
    assert engine.returncode == -signal.SIGKILL
