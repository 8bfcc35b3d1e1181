"""Shared helpers of the benchmarks: timing, the fp32 matmul ceiling, machine info, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path("bench/results")


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of this process: robust to other processes' load on a shared machine when torch runs
    # one thread (with several, OpenMP's spin-waiting is counted too)
    "cpu": time.process_time,
}


def timed(fn: Callable[[], Any], warmup: int, repeats: int, clock: str = "wall") -> list[float]:
    """Seconds per call of `fn` (after `warmup` untimed calls) on the `wall` or `cpu` clock."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = now()
        fn()
        out.append(now() - start)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


@torch.inference_mode()
def matmul_gflops(m: int, k: int, n: int, warmup: int = 2, repeats: int = 5, clock: str = "wall") -> float:
    """Plain fp32 (m x k) @ (k x n) GFLOP/s (2 m n k FLOPs per product), best of `repeats`."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    seconds = min(timed(lambda: torch.mm(a, b, out=out), warmup, repeats, clock))
    return 2.0 * m * n * k / seconds / 1e9


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": load, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """`out_dir/<name>.json` (latest) plus a timestamped copy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2)
    (out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    path = out_dir / f"{name}.json"
    path.write_text(text)
    return path
