"""One rank of `sglang-fleet nccl-check`: an all-reduce over a range of sizes, checked and timed.

It runs under FLEET_ENGINE_PYTHON (the Python that has torch and SGLang), which need not have sglang_fleet
installed, so it is started as a script and imports only the standard library and torch. It prints JSON
lines on stdout: one `allreduce` record per size (only with --report), then one `done` or `error` record.
NCCL's own log (NCCL_DEBUG) goes to stderr. Bandwidths follow nccl-tests: algbw = bytes / time,
busbw = algbw * 2(n-1)/n for an all-reduce over n ranks; the time is the slowest rank's mean.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

PATTERN_PERIOD = 251  # values stay small integers: float32 sums are exact, so equality is the check


def emit(record: str, **fields) -> None:
    print(json.dumps({"record": record, **fields}), flush=True)


def sizes(lo: int, hi: int) -> list[int]:
    out, size = [], max(4, lo)
    while size <= hi:
        out.append(size)
        size *= 2
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--init-method", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--local-rank", type=int, default=0)
    p.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    p.add_argument("--min-bytes", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--report", action="store_true", help="print one record per size (local rank 0)")
    a = p.parse_args(argv)
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        emit("error", rank=a.rank, reason=f"torch is not importable in {sys.executable}: {e}")
        return 4
    cuda = a.backend == "nccl"
    if cuda:
        if torch.cuda.device_count() <= a.local_rank:
            emit("error", rank=a.rank, reason=f"local GPU {a.local_rank} is not visible to torch "
                 f"({torch.cuda.device_count()} visible)")
            return 4
        torch.cuda.set_device(a.local_rank)
        dev = torch.device("cuda", a.local_rank)
    else:
        dev = torch.device("cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    began = time.monotonic()
    try:
        extra = {"device_id": dev} if cuda else {}  # NCCL: create the communicator now, fail here
        dist.init_process_group(a.backend, init_method=a.init_method, world_size=a.world_size, rank=a.rank,
                                timeout=datetime.timedelta(seconds=a.timeout), **extra)
        probe = torch.ones(1, device=dev)
        dist.all_reduce(probe)
        sync()
    except Exception as e:  # noqa: BLE001 - any init failure is the answer of this check
        emit("error", rank=a.rank, reason=f"{a.backend} init via {a.init_method} (world {a.world_size}, rank "
             f"{a.rank}) failed: {type(e).__name__}: {_first_line(e)}")
        return 2
    init_s = time.monotonic() - began
    n_ranks, wrong = a.world_size, []
    offset = n_ranks * (n_ranks + 1) / 2  # sum over ranks of (rank + 1)
    try:
        for size in sizes(a.min_bytes, a.max_bytes):
            n = size // 4
            pattern = torch.arange(n, device=dev, dtype=torch.float32).remainder_(PATTERN_PERIOD)
            buf = pattern + (a.rank + 1)
            dist.all_reduce(buf)
            sync()
            correct = bool(torch.equal(buf, pattern * n_ranks + offset))
            if not correct:
                wrong.append(size)
            del pattern
            buf.zero_()  # timed sums stay 0: no overflow however many iterations
            for _ in range(a.warmup):
                dist.all_reduce(buf)
            sync()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                dist.all_reduce(buf)
            sync()
            slowest = torch.tensor([(time.perf_counter() - t0) / a.iters], device=dev, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = float(slowest.item())
            algbw = size / seconds / 1e9
            if a.report:
                emit("allreduce", size=size, time_us=round(seconds * 1e6, 2), algbw_GBps=round(algbw, 4),
                     busbw_GBps=round(algbw * 2 * (n_ranks - 1) / n_ranks, 4), correct=correct)
            del buf
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        emit("error", rank=a.rank, reason=f"all-reduce failed after init: {type(e).__name__}: {_first_line(e)}")
        return 3
    nccl = None
    if cuda:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    device = torch.cuda.get_device_name(dev) if cuda else "cpu"
    if wrong:
        emit("error", rank=a.rank, reason=f"wrong all-reduce result for sizes {wrong} (bytes)")
        return 3
    emit("done", rank=a.rank, init_s=round(init_s, 3), torch=torch.__version__, nccl=nccl, device=device)
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
