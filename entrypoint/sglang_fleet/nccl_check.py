"""`sglang-fleet nccl-check`: a preflight all-reduce across a group, set up exactly as the engine would be.

Run on every host of a group with the group's FLEET_* settings. It joins the rendezvous in Consul as group
`<group>-nccl-check` (a serving group is never touched), gets rank and dist-init address as `node` does,
builds the engine environment with `launch.build_launch` (NCCL/GLOO profile, NCCL_SOCKET_IFNAME, ...) and
runs one nccl_allreduce.py worker per local GPU under FLEET_ENGINE_PYTHON with it: NCCL init via
`tcp://<dist-init addr>`, all-reduce 8 B..256 MiB, every sum checked, bandwidths as nccl-tests reports them.
Then it ends its generation, destroys its session and withdraws its heartbeat. Exit 0 when every sum was
right; 1 with a one-line reason otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sglang_fleet import consul_api as ca
from sglang_fleet import launch, logs, netprofile
from sglang_fleet import registration as reg
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import EX_CONFIG, NAME_RE, FleetConfig
from sglang_fleet.membership import Action, Membership, Step

GROUP_SUFFIX = "-nccl-check"
WORKER = Path(__file__).with_name("nccl_allreduce.py")
EX_FAILED = 1
DEPARTURE_GRACE = 10.0  # a finished peer ends the generation a moment before we finish too
SHOWN_ENV = ("NCCL_", "GLOO_", "CUDA_VISIBLE_DEVICES", "NVSHMEM_", "TORCH_SYMM_MEM")


class CheckFailed(Exception):
    """The check did not pass; the message is the one-line reason."""


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def visible_gpus() -> int:
    """GPUs this process may use: /dev/nvidia<N> or nvidia-smi, limited by CUDA_VISIBLE_DEVICES."""
    from sglang_fleet.doctor import Host, count_gpus  # lazily: doctor is large
    found, _ = count_gpus(Host())
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return found
    listed = len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    return min(listed, found) if found else listed


def check_config(cfg: FleetConfig, dist_port: int | None) -> FleetConfig:
    group = f"{cfg.group or cfg.node_name}{GROUP_SUFFIX}"
    if not NAME_RE.match(group):
        raise CheckFailed(f"FLEET_GROUP={cfg.group!r}: the check group {group!r} is not a valid name "
                          f"(at most 63 letters, digits, '.', '_' and '-'); use a shorter group name")
    return dataclasses.replace(cfg, group=group, dist_port=dist_port or cfg.dist_port)


class Check:
    def __init__(self, cfg: FleetConfig, args, gpus: int):
        self.cfg, self.args, self.gpus = cfg, args, gpus
        self.log = logs.get("sglang_fleet.nccl_check")
        self.addr = netprofile.resolve_advertise_addr(cfg)
        self.api = ca.ConsulAPI(cfg.consul)
        self.rdv = rdv.Rendezvous(self.api, cfg, cfg.node_name, self.addr)
        # Every member must start the same number of processes, or the world sizes disagree.
        self.rdv.fingerprint["nccl_check"] = {"gpus_per_node": gpus, "backend": args.backend}
        self.stop = threading.Event()
        self.heartbeat = reg.Heartbeat(cfg, self.addr, self.stop)
        self.deadline = time.monotonic() + args.timeout
        # The same rendezvous handler as `node`; every member must also run the same check.
        self.membership = Membership(self.rdv, self.heartbeat, agree_on=("nccl_check",))
        self.procs: list[subprocess.Popen] = []
        self.last = ""
        self.records: list[dict] = []  # from every worker; list.append is atomic
        self.pumps: list[threading.Thread] = []

    def say(self, sentence: str) -> None:
        if sentence and sentence != self.last:
            self.log.info(sentence)
            self.last = sentence

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"timed out after {self.args.timeout:g} s (--timeout); last: {self.last}")
        return left

    def join(self) -> rdv.Assignment:
        """Rendezvous exactly as `node` does (the same membership.Membership), up to the barrier: rank,
        nnodes and the dist-init address. Waits on blocking queries instead of a watcher thread."""
        while not self.heartbeat.registered.wait(0.2):
            self.left()
            self.say(f"waiting for the heartbeat check in Consul {self.api.address}"
                     + (f" ({self.heartbeat.last_error})" if self.heartbeat.last_error else ""))
        index = 0
        while True:
            self.left()
            step = self.membership.guarded(lambda: self.step(index))
            self.say(step.sentence or "")
            if self.membership.assignment is not None:
                return self.membership.assignment
            if step.action is Action.DISAGREE:
                raise CheckFailed("the group does not agree: " + "; ".join(step.problems))
            if step.action is Action.ENDED:  # rejoin the next generation; nothing runs yet
                self.say(self.membership.leave() or "")
                self.membership.reset()
            if step.action is Action.UNAVAILABLE:
                time.sleep(step.wait)
            # Nothing to do: wait (a blocking query) until the group changes. After an action: read at once.
            index = self.membership.view.index if step.action is Action.WAIT and self.membership.view else 0

    def step(self, index: int) -> Step:
        """Reads the group (blocking until it changes past `index`, at most 2 s) and takes one step."""
        view = self.membership.view = self.rdv.read(index=index, wait="2s")
        return self.membership.step(view)

    def spawn(self, a: rdv.Assignment) -> None:
        """One worker per local GPU, with the engine's environment (launch.build_launch)."""
        spec = launch.build_launch(self.cfg, a.rank, a.nnodes, a.dist_init_addr, self.addr)
        for note in spec.warnings:
            self.log.info(f"launch note: {note}")
        self.env = spec.env
        host, _, port = a.dist_init_addr.rpartition(":")
        init = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        world = a.nnodes * self.gpus
        for local in range(self.gpus):
            argv = [self.cfg.engine_python, str(WORKER), "--init-method", init, "--world-size", str(world),
                    "--rank", str(a.rank * self.gpus + local), "--local-rank", str(local),
                    "--backend", self.args.backend, "--min-bytes", str(self.args.min_bytes),
                    "--max-bytes", str(self.args.max_bytes), "--iters", str(self.args.iters),
                    "--timeout", str(int(self.left()))] + (["--report"] if local == 0 else [])
            proc = subprocess.Popen(argv, env={**spec.env, "LOCAL_RANK": str(local)}, stdout=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            self.procs.append(proc)
            self.pumps.append(threading.Thread(target=self._pump, args=(proc,), name=f"pump-{local}", daemon=True))
            self.pumps[-1].start()
        self.say(f"rank {a.rank} of {a.nnodes}: {self.args.backend} all-reduce over {world} process(es) "
                 f"({self.gpus} here) via {init}")

    def _pump(self, proc: subprocess.Popen) -> None:
        """Keeps the worker's JSON records; the rest of its stdout is NCCL's log (NCCL_DEBUG): to stderr."""
        for line in proc.stdout:
            if line.startswith('{"record"'):
                self.records.append(json.loads(line))
            else:
                sys.stderr.write(line)
        sys.stderr.flush()

    def watch(self, a: rdv.Assignment) -> None:
        """Waits for the workers; stops them at the deadline or some seconds after a peer left."""
        gone, gone_at = "", 0.0
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > self.deadline or (gone and time.monotonic() - gone_at > DEPARTURE_GRACE):
                raise CheckFailed(f"{self.args.backend} all-reduce did not finish " + (
                    f"after {gone} left the check" if gone else
                    f"within {self.args.timeout:g} s: is {a.dist_init_addr} reachable from every node, and "
                    f"NCCL_SOCKET_IFNAME={self.env.get('NCCL_SOCKET_IFNAME')} right?"))
            try:
                if not gone:
                    gone = ", ".join(f"{m.node} (rank {m.rank})" for m in self.membership.departures(self.rdv.read()))
                    gone_at = time.monotonic()
            except ca.ConsulError:
                pass  # the workers are the answer; Consul only explains a peer's absence
            time.sleep(0.5)

    def collect(self, a: rdv.Assignment, began: float) -> dict:
        for pump in self.pumps:
            pump.join(timeout=10)
        sizes = [r for r in self.records if r["record"] == "allreduce"]
        for r in sizes:
            print(json.dumps(r) if self.args.json else
                  f"{r['size']:>12} B {r['time_us']:>11.1f} us {r['algbw_GBps']:>9.2f} GB/s algbw "
                  f"{r['busbw_GBps']:>9.2f} GB/s busbw  {'ok' if r['correct'] else 'WRONG'}", flush=True)
        done = [r for r in self.records if r["record"] == "done"]
        errors = [r["reason"] for r in self.records if r["record"] == "error"]
        errors += [f"worker {i} exited with {p.returncode}" for i, p in enumerate(self.procs)
                   if p.returncode and not errors]
        first = done[0] if done else {}
        return {"record": "summary", "ok": not errors and len(done) == len(self.procs), "node": self.cfg.node_name,
                "group": self.cfg.group, "generation": a.generation, "rank": a.rank, "nnodes": a.nnodes,
                "dist_init_addr": a.dist_init_addr, "world_size": a.nnodes * self.gpus, "gpus_per_node": self.gpus,
                "backend": self.args.backend, "sizes": len(sizes), "all_correct": bool(sizes) and all(
                    r["correct"] for r in sizes), "max_busbw_GBps": max((r["busbw_GBps"] for r in sizes), default=None),
                "torch": first.get("torch"), "nccl": first.get("nccl"), "device": first.get("device"),
                "init_s": first.get("init_s"), "seconds": round(time.monotonic() - began, 2), "errors": errors,
                "env": {k: v for k, v in sorted(self.env.items()) if k.startswith(SHOWN_ENV)}}

    def finish(self, reason: str, failed: bool) -> None:
        """Stops leftover workers, ends the generation (one member wins), destroys the session, withdraws
        the heartbeat."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # a second signal ends the clean-up too
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        try:
            view, session = self.rdv.read(), self.membership.session
            if session and view.rank_of(session) is not None:
                self.rdv.end_generation(view, reason, rdv.LOCAL_FAILURE if failed else rdv.SHUTDOWN)
            if session:
                self.api.session_destroy(session)
        except ca.ConsulError as exc:
            self.log.warning(f"could not clean up the check's generation: {exc}")
        self.stop.set()
        self.heartbeat.join(timeout=3)
        try:
            self.api.deregister_service(reg.member_id(self.cfg))
        except ca.ConsulError as exc:
            self.log.warning(f"heartbeat not deregistered: {exc}")
        self.api.close()

    def run(self) -> int:
        began = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: still clean up Consul and the workers
            signal.signal(sig, _stopped)
        self.heartbeat.start()
        summary, failure = None, None
        try:
            a = self.join()
            self.say(f"barrier passed: rank {a.rank} of {a.nnodes}, dist-init {a.dist_init_addr}")
            self.spawn(a)
            self.watch(a)
            summary = self.collect(a, began)
            failure = None if summary["ok"] else "; ".join(summary["errors"]) or "no result"
        except CheckFailed as exc:
            failure = str(exc)
        except ca.ConsulError as exc:
            failure = f"Consul at {self.api.address}: {exc}"
        finally:
            self.finish(f"nccl-check {'failed: ' + failure if failure else 'passed'} on {self.cfg.node_name}",
                        failed=failure is not None)
        summary = summary or {"record": "summary", "ok": False, "node": self.cfg.node_name, "group": self.cfg.group}
        summary["reason"] = failure
        if self.args.json:
            print(json.dumps(summary), flush=True)
        if failure:
            print(f"sglang-fleet nccl-check: FAILED on {self.cfg.node_name}: {failure}", file=sys.stderr)
            return EX_FAILED
        print(f"sglang-fleet nccl-check: passed on {self.cfg.node_name}: rank {summary['rank']} of "
              f"{summary['nnodes']}, world {summary['world_size']}, dist-init {summary['dist_init_addr']}, "
              f"max busbw {summary['max_busbw_GBps']} GB/s ({summary['device']}, NCCL {summary['nccl']})",
              file=sys.stderr)
        return 0


def _stopped(signum, _frame):
    raise CheckFailed(f"stopped by {signal.Signals(signum).name}")


def run(cfg: FleetConfig, args) -> int:
    """`sglang-fleet nccl-check` (cli.py: gpus_per_node, backend, min_bytes, max_bytes, iters, timeout,
    dist_port, json)."""
    try:
        lo, hi = parse_bytes(args.min_bytes), parse_bytes(args.max_bytes)
    except (ValueError, IndexError):
        lo = hi = 0
    if not 4 <= lo <= hi:
        print(f"sglang-fleet: configuration error: --min-bytes={args.min_bytes!r} --max-bytes={args.max_bytes!r}: "
              f"need byte counts such as 8, 64K, 256M or 1G with 4 <= min <= max", file=sys.stderr)
        return EX_CONFIG
    args.min_bytes, args.max_bytes = lo, hi
    try:
        check_cfg = check_config(cfg, args.dist_port)
        wanted = args.gpus_per_node or cfg.gpus_per_node
        gpus = min(wanted, visible_gpus()) if args.backend == "nccl" else wanted
        if gpus < 1:
            raise CheckFailed("no GPU visible (CUDA_VISIBLE_DEVICES, /dev/nvidia<N>, nvidia-smi)")
    except CheckFailed as exc:
        print(f"sglang-fleet nccl-check: FAILED: {exc}", file=sys.stderr)
        return EX_FAILED
    return Check(check_cfg, args, gpus).run()
