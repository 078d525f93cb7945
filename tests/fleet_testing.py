"""Helpers shared by the test tiers and the benchmarks (scripts/bench_*.py): waiting, loopback ports,
process trees, JSON results. A plain module with a unique name, importable because tests/conftest.py
puts tests/ on sys.path (pytest's prepend import mode); the benchmarks add tests/ themselves."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from sglang_fleet.process_group import proc_stats

FLEET_BIN = Path(sys.executable).parent / "sglang-fleet"  # the console script of this venv

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed to processes that bind them later (seconds later; a real engine's HTTP port after its model
# loaded) come from below the kernel's ephemeral range: a port in it may meanwhile become the local port
# of an outgoing connection (a probe, a Consul request), and then binding it fails with EADDRINUSE (binding
# 0.0.0.0:P fails while 127.0.0.1:P is a connection's local port).
PORT_RANGE = range(10000, max(_ephemeral_low(), 10000 + 4096))
_port_picker = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, outside the ephemeral range and not handed out before in this
    process (the sim binds its HTTP port on 0.0.0.0, so ports must differ across loopback addresses too)."""
    while True:
        port = _port_picker.randrange(PORT_RANGE.start, PORT_RANGE.stop)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use
        _handed_out.add(port)
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.1) -> Any:
    """Polls `predicate` until it returns something truthy; fails the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the predicate may race with processes starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc: engines run in their own process groups)."""
    children: dict[int, list[int]] = {}
    for child, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append(child)
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# smg's 503 error code when it has no worker of the type a request needs: the request reached smg after
# the router agent had removed the group (with one group of that type, every request sent from then on).
SMG_NO_WORKER = "no_available_workers"


def smg_refused_for_want_of_a_worker(body: object) -> bool:
    """`body` (a parsed error response) is smg's refusal for lack of a worker: the request was never sent on."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("code") == SMG_NO_WORKER


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill_quietly(pid: int, sig: int) -> None:
    """os.kill that ignores a process already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_group(proc) -> None:
    """SIGKILL to the process group a `start_new_session` Popen leads, then reaps it (no-op when it is gone)."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def emit_json(result: dict, out: Path | None) -> None:
    """A benchmark's result: printed, and written to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def install_wheel(workdir: Path) -> Path:
    """Builds sglang-fleet's wheel from a copy of its sources (the checkout stays untouched), installs it in a
    fresh venv under `workdir` and returns that venv's `sglang-fleet`. The dependencies come from the configured
    package index; where none answers, the wheel goes in with --no-deps and this venv's site-packages are
    appended to the new venv's path (a .pth file: the checkout's editable install is not among them)."""
    import shutil
    import site
    import subprocess
    root = Path(__file__).resolve().parents[1]
    src = workdir / "src"
    shutil.copytree(root / "entrypoint" / "sglang_fleet", src / "entrypoint" / "sglang_fleet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)

    def run(*argv: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=workdir)

    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", workdir / "dist", src)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    [wheel] = (workdir / "dist").glob("sglang_fleet-*.whl")
    venv = workdir / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)  # the base interpreter, not this venv
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", py, "install", "-q", wheel)
    if installed.returncode:
        fallback = run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel)
        assert fallback.returncode == 0, f"pip install failed:\n{installed.stderr}\n{fallback.stderr}"
        purelib = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        Path(purelib, "fleet-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin" / "sglang-fleet"
