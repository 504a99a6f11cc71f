"""Throughput: faces per second of plain G, of the guard on clean and on attacked faces.

All are timed in the same run on the same device, each guard phase against plain G at the same
batch size (the bench's, and the clean path again at ``clean_batch``), so their ratios are
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
    batch: int | None = None,
) -> dict[str, float]:
    dev = bench.device
    size = batch or bench.batch
    batches = list(bench._batches(x, c, size))
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
    n = repeats * x.shape[0]
    out = {"faces_per_s": n / dt, "seconds": dt, "faces": n, "batch": size}
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
    clean_batch: int | None = 8,
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
        clean_batch: a second batch size for plain G and the clean path (the issue's target
            is set at 8 faces on the CPU); ``None`` or the bench's batch: not repeated.
    """

    def plain(xb: torch.Tensor, cb: torch.Tensor | None) -> Any:
        return bench.G(xb, cb)

    res: dict[str, Any] = {
        "plain G": _timed(bench, plain, x_clean, c, repeats),
        "guard, clean input": _timed(bench, bench.guard, x_clean, c, repeats),
        "guard, attacked input": _timed(bench, bench.guard, x_adv, c, repeats),
    }
    if disrupted is not None and disrupted[0].shape[0]:
        res["guard, disrupted input"] = _timed(bench, bench.guard, *disrupted, repeats)
    if clean_batch and clean_batch != bench.batch:
        for name, fn in (("plain G", plain), ("guard, clean input", bench.guard)):
            res[f"{name}, batch {clean_batch}"] = _timed(
                bench, fn, x_clean, c, repeats, clean_batch
            )
    base = {v["batch"]: v["faces_per_s"] for k, v in res.items() if k.startswith("plain G")}
    for v in res.values():
        v["ratio"] = v["faces_per_s"] / base[v["batch"]]
    if bench.device.type != "cuda":
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["batch"] = bench.batch
    return res
