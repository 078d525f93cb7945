"""The child supervisor (child.py) with real short-lived processes: no fakes of the OS."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from structlog.testing import capture_logs

from fleet_testing import process_alive as alive, wait_until
from sglang_fleet import launch, netprofile
from sglang_fleet.child import Child, IllegalTransition, State, inherited_env
from sglang_fleet.config import FleetConfig
from sglang_fleet.process_group import group_alive, group_pids
from sglang_fleet.smg_process import smg_env

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(120)"]
# Ignores SIGTERM, starts a grandchild in its group, writes the grandchild's pid to argv[1], then sleeps.
STUBBORN = textwrap.dedent('''
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(gc.pid))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(120)
''')


@pytest.fixture
def children():
    made: list[Child] = []

    def make(name: str = "child", **kw) -> Child:
        made.append(Child(name, **{"stop_grace": 5.0, **kw}))
        return made[-1]
    yield make
    for c in made:  # never leave a process behind, even when a test fails
        c.stop_and_wait(0.5)


def eventually(check, timeout: float = 10.0):
    return wait_until(check, timeout, "condition", interval=0.02)


def poll_until(child: Child, state: State, timeout: float = 10.0) -> None:
    eventually(lambda: child.poll() is state, timeout)


# ---- states and transitions -------------------------------------------------------------------------------
def test_a_life_start_ready_stop(children):
    child = children()
    assert child.state is State.STOPPED and child.stop() == "child not started"
    assert child.start(SLEEPER) == f"child started pid {child.pid}"
    assert child.poll() is State.STARTING and child.starts == 1
    child.ready("child answers")
    assert child.poll() is State.RUNNING and child.starts == 0
    pid = child.pid
    assert child.stop_and_wait().startswith("child stopped after SIGTERM in ")
    assert child.state is State.STOPPED and child.pid is None and child.returncode == -signal.SIGTERM
    assert not alive(pid)
    assert [s for s, _ in child.history] == [State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED]


def test_an_exit_is_noticed_by_poll(children):
    child = children()
    child.start([PY, "-c", "raise SystemExit(3)"])
    poll_until(child, State.EXITED)
    assert child.reason == "child exited with code 3 before ready" and child.failed and child.returncode == 3
    child.stop()
    assert child.state is State.STOPPED  # nothing left of its group: done at once


def test_illegal_transitions_raise_and_spawn_nothing(children):
    child = children()
    with pytest.raises(IllegalTransition):
        child.ready("ready before it was started")
    with pytest.raises(IllegalTransition):
        child.retry_later(1.0)  # only a failed child is retried
    child.start(SLEEPER)
    first = child.pid
    with pytest.raises(IllegalTransition, match="STARTING -> STARTING"):
        child.start(SLEEPER)
    assert child.pid == first and child.starts == 1
    os.kill(first, signal.SIGKILL)
    poll_until(child, State.EXITED)
    with pytest.raises(IllegalTransition, match="EXITED -> RUNNING"):
        child.ready("too late")
    with pytest.raises(IllegalTransition, match="EXITED -> STARTING"):
        child.start(SLEEPER)  # what is left of its group must be stopped first


def test_a_missing_executable_is_an_exit_without_a_process(children):
    child = children()
    assert child.start(["/nonexistent/binary"]).startswith("child could not be started: ")
    assert child.state is State.EXITED and child.pid is None
    assert child.stop().startswith("child stopped (child could not be started: ")


# ---- stop: non-blocking, escalated by poll() ----------------------------------------------------------------
def test_stop_returns_at_once_and_poll_sigkills_the_whole_group_after_the_grace(children, tmp_path):
    gc_file = tmp_path / "grandchild"
    child = children()
    child.start([PY, "-c", STUBBORN, str(gc_file)])
    grandchild = int(eventually(lambda: gc_file.exists() and gc_file.read_text()))
    leader = child.pid
    sentence = child.stop(grace=0.5)
    assert sentence == f"stopping child pid {leader}: SIGTERM to its process group, 0.5 s grace"
    # stop() did not wait: both ignore SIGTERM and are still there
    assert child.state is State.STOPPING and alive(leader) and alive(grandchild)
    poll_until(child, State.STOPPED)
    assert "with SIGKILL after 0.5 s grace" in child.reason and "(exit code -9)" in child.reason
    assert not alive(leader) and not alive(grandchild) and not group_alive(leader)


def test_leader_first_gets_sigterm_alone_then_the_rest_of_its_group(children, tmp_path):
    """The engine's rank 0: launch_server must drain while its children still live."""
    gc_file, seen = tmp_path / "grandchild", tmp_path / "seen"
    script = textwrap.dedent(f'''
        import os, signal, subprocess, sys, time
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        def term(*_):
            open({str(seen)!r}, "w").write(str(gc.poll() is None))
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        open({str(gc_file)!r} + ".tmp", "w").write(str(gc.pid))
        os.rename({str(gc_file)!r} + ".tmp", {str(gc_file)!r})
        time.sleep(120)
    ''')
    child = children(leader="launcher", term_leader_first=True)
    child.start([PY, "-c", script])
    grandchild = int(eventually(lambda: gc_file.exists() and gc_file.read_text()))
    assert "SIGTERM to launcher" in child.stop(grace=5)
    poll_until(child, State.STOPPED)
    assert seen.read_text() == "True"  # the grandchild was alive when the launcher got SIGTERM
    assert "after SIGTERM" in child.reason and "(exit code 0)" in child.reason
    assert not alive(grandchild)


# On SIGTERM the leader thread exits first (SYS_exit ends only the calling thread) while a last thread
# lingers, then ends the process with 7: /proc shows the leader as a zombie meanwhile.
LEADER_THREAD_FIRST = textwrap.dedent('''
    import ctypes, os, signal, sys, threading, time
    def linger():
        time.sleep(3.0)
        os._exit(7)
    def on_term(*_):
        threading.Thread(target=linger).start()
        ctypes.CDLL(None).syscall(60, 0)
    signal.signal(signal.SIGTERM, on_term)
    open(sys.argv[1], "w").close()
    time.sleep(120)
''')


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64 only")
def test_a_leader_that_only_looks_dead_is_waited_for_and_reaped(children, tmp_path):
    """A multi-threaded leader whose main thread has exited reads as a zombie in /proc while its last
    threads still run: the stop ends once it is reaped, with its exit code, and leaves no zombie."""
    ready = tmp_path / "ready"
    child = children()
    child.start([PY, "-c", LEADER_THREAD_FIRST, str(ready)])
    eventually(ready.exists)
    leader = child.pid
    child.stop(grace=30)
    eventually(lambda: not alive(leader))  # /proc: "Z" while its last thread sleeps
    assert child.poll() is State.STOPPING
    poll_until(child, State.STOPPED)
    assert child.returncode == 7 and "(exit code 7)" in child.reason
    assert not os.path.exists(f"/proc/{leader}")  # reaped: not left a zombie under the supervisor


def test_a_second_stop_shortens_the_grace(children, tmp_path):
    gc_file = tmp_path / "grandchild"
    child = children()
    child.start([PY, "-c", STUBBORN, str(gc_file)])
    eventually(gc_file.exists)
    child.stop(grace=60)
    assert child.stop_and_wait(grace=0.2).startswith("child stopped with SIGKILL after ")


# ---- BACKOFF and FATAL ---------------------------------------------------------------------------------------
def test_retry_later_backs_off_then_gives_up_after_max_starts(children):
    child = children(max_starts=2)
    failing = [PY, "-c", "raise SystemExit(1)"]
    child.start(failing)
    poll_until(child, State.EXITED)
    child.retry_later(0.2)
    poll_until(child, State.BACKOFF)
    assert child.reason.startswith("child exited with code 1 before ready; child stopped after SIGTERM")
    assert child.reason.endswith("starting again in 0.2 s (start 2/2)")
    eventually(lambda: child.backoff_over)
    child.start(failing)
    assert child.starts == 2
    poll_until(child, State.EXITED)
    child.retry_later(0.2)
    poll_until(child, State.FATAL)
    assert child.reason.endswith("2 start(s) in a row failed, giving up") and child.failed
    child.start(SLEEPER)  # an explicit start out of FATAL begins a new series
    assert child.state is State.STARTING and child.starts == 1
    child.stop_and_wait()
    child.start(failing)  # and so does one out of STOPPED
    assert child.starts == 1
    poll_until(child, State.EXITED)
    child.retry_later(0.2)
    with pytest.raises(IllegalTransition):
        child.retry_later(0.2)  # it is no longer a failed child: stopping or backing off
    poll_until(child, State.BACKOFF)
    eventually(lambda: child.backoff_over)
    child.start(failing)
    poll_until(child, State.EXITED)
    child.retry_later(0.2)
    poll_until(child, State.FATAL)
    assert child.stop().startswith("child stopped (") and child.state is State.STOPPED  # a stop always ends STOPPED


def test_stop_during_backoff_stops_for_good(children):
    child = children(max_starts=3)
    child.start([PY, "-c", "raise SystemExit(1)"])
    poll_until(child, State.EXITED)
    child.retry_later(60)
    poll_until(child, State.BACKOFF)
    assert child.stop() == "child stopped (it was waiting to start again)"
    assert child.state is State.STOPPED and not child.backoff_over


# ---- environment, process group, death signal, output ---------------------------------------------------------
def test_one_environment_policy_for_every_child():
    """The engine's environment (launch.engine_env) and smg's strip the same variables: child.inherited_env."""
    parent = {"PATH": "/bin", "HOME": "/root", "SGLANG_X": "1", "NCCL_DEBUG": "WARN", "FLEET_ROUTER_API_KEY": "k",
              "FLEET_MODEL_PATH": "m", "CONSUL_HTTP_TOKEN": "t", "CONSUL_HTTP_ADDR": "a:8500"}
    kept = {"PATH", "HOME", "SGLANG_X", "NCCL_DEBUG"}
    assert set(inherited_env(parent)) == kept
    assert set(smg_env(parent)) & set(parent) == kept
    profile = netprofile.NetProfile("test", "test")  # no variables of its own: only what is inherited
    engine_env, _ = launch.engine_env(FleetConfig(), "127.0.0.1", parent, profile)
    assert set(engine_env) & set(parent) == kept


def test_the_child_gets_the_environment_built_for_it_and_its_own_group(children, tmp_path):
    out = tmp_path / "env.json"
    dump = f"import json, os; json.dump([dict(os.environ), os.getpgid(0), os.getsid(0)], open({str(out)!r}, 'w'))"
    child = children()
    parent = {**os.environ, "FLEET_SECRET": "x", "CONSUL_HTTP_TOKEN": "t", "KEEP_ME": "1"}
    child.start([PY, "-c", dump], inherited_env(parent))
    poll_until(child, State.EXITED)
    env, pgid, sid = json.loads(out.read_text())
    assert env["KEEP_ME"] == "1" and "FLEET_SECRET" not in env and "CONSUL_HTTP_TOKEN" not in env
    assert pgid == sid == child.pid and pgid != os.getpgid(0)


# A supervisor in miniature: spawns a sleeper (with a child of its own) through Child, writes the sleeper's
# pid, then dies as told.
PARENT = textwrap.dedent('''
    import os, sys, time
    from sglang_fleet.child import Child
    pid_file, how = sys.argv[1], sys.argv[2]
    child = Child("sleeper")
    child.start([sys.executable, "-c", "import subprocess, sys, time; "
                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(120 if how == "kill9" else 1.0)
    sys.exit(0)  # an interpreter that ends with its child still running
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize("how", ["kill9", "exit"])
def test_no_child_outlives_its_supervisor(tmp_path, how):
    """kill -9: the death signal kills the process the supervisor spawned (its own children die with it
    only where they ask to, as SGLang's do); an interpreter that simply ends takes the whole group along."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([PY, "-c", PARENT, str(pid_file), how], stdin=subprocess.DEVNULL)
    leader = None
    try:
        leader = int(eventually(lambda: pid_file.exists() and pid_file.read_text(), timeout=20))
        eventually(lambda: len(group_pids(leader)) == 2)  # the sleeper and its child, in a group of their own
        if how == "kill9":
            os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=20)
        eventually(lambda: not alive(leader))
        if how == "exit":
            eventually(lambda: not group_alive(leader))
    finally:
        if parent.poll() is None:
            parent.kill()
        if leader and group_alive(leader):
            os.killpg(leader, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_death_signal_follows_the_spawning_thread(children):
    child = children()
    spawner = threading.Thread(target=child.start, args=(SLEEPER,))
    spawner.start()
    spawner.join()
    poll_until(child, State.EXITED)
    assert child.returncode == -signal.SIGKILL


def test_output_lines_become_log_events_with_context(children):
    child = children("pump", context={"group": "g"})
    with capture_logs() as events:
        child.start([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
        poll_until(child, State.EXITED)
        child.stop_and_wait()
    lines = {(e["stream"], e["line"]) for e in events if e["event"] == "pump_output"}
    assert lines == {("stdout", "out"), ("stderr", "err")}
    assert all(e["group"] == "g" for e in events if "state" in e or e["event"] == "pump_output")
