"""Throughput: faces per second of plain G, of the guard on clean and on attacked faces.

All three are timed in the same run on the same device and batch size, so their ratios are
meaningful even on a busy machine; absolute numbers are not. Peak memory is the CUDA allocator's
peak per phase on a GPU, and the process's peak resident set size on the CPU.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import Bench


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    bench: Bench,
    fn: Callable[[torch.Tensor, torch.Tensor | None], Any],
    x: torch.Tensor,
    c: torch.Tensor | None,
    repeats: int,
) -> dict[str, float]:
    dev = bench.device
    batches = list(bench._batches(x, c))
    with torch.inference_mode():
        xb, cb = batches[0]
        fn(xb[:2], None if cb is None else cb[:2])  # warm-up (cuDNN autotuning, allocator)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            for xb, cb in batches:
                fn(xb, cb)
    _sync(dev)
    dt = time.perf_counter() - t0
    out = {"faces_per_s": repeats * x.shape[0] / dt, "seconds": dt, "faces": repeats * x.shape[0]}
    if dev.type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def run(
    bench: Bench,
    x_clean: torch.Tensor,
    x_adv: torch.Tensor,
    c: torch.Tensor | None,
    repeats: int = 1,
    disrupted: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> dict[str, Any]:
    """Time G, guard(clean) and guard(attacked) on the same faces and batch size.

    Args:
        bench: the benchmark state.
        x_clean: clean faces :math:`(B, 3, S, S)`.
        x_adv: the same faces attacked (PGD), same shape; only some of them disrupt G.
        c: their conditions.
        repeats: passes over the faces per phase.
        disrupted: attacked faces that all disrupt G and their conditions: what a disrupted
            face costs (detection, reconstruction, the check after it).
    """
    res: dict[str, Any] = {
        "plain G": _timed(bench, lambda xb, cb: bench.G(xb, cb), x_clean, c, repeats),
        "guard, clean input": _timed(bench, bench.guard, x_clean, c, repeats),
        "guard, attacked input": _timed(bench, bench.guard, x_adv, c, repeats),
    }
    if disrupted is not None and disrupted[0].shape[0]:
        res["guard, disrupted input"] = _timed(bench, bench.guard, *disrupted, repeats)
    base = res["plain G"]["faces_per_s"]
    for v in res.values():
        v["ratio"] = v["faces_per_s"] / base
    if bench.device.type != "cuda":
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["batch"] = bench.batch
    return res
