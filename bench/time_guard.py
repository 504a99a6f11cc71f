"""Per-face CPU/GPU time of plain G, the guard on clean faces and the guard's reconstruct path.

For a StarGAN layout of any width (the full-size paper layout by default, random weights — the
cost does not depend on the weights) and for the shipped default generator when present::

    python -m bench.time_guard --device cpu --faces 4
    python -m bench.time_guard --device cuda --faces 64     # on a GPU machine

"Guard, reconstruct" forces every face through detection + Rec-Net + re-detection (threshold
below every score), which is the cost an attacked face pays; "guard, clean" is detection only.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

import magdr
from magdr.faces.parsenet import ParseNet
from magdr.faces.parsing import ParseNetParser, load_parser
from magdr.models.stargan import StarGAN
from magdr.profile import load_profile


def _per_face(fn, x: torch.Tensor, c: torch.Tensor, device: torch.device, repeats: int) -> float:
    fn(x[:1], c[:1])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x, c)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / (repeats * x.shape[0])


def time_generator(
    G: torch.nn.Module, parser: torch.nn.Module, device: str, faces: int, repeats: int
) -> dict:
    """Seconds per face for G, guard (clean) and guard (forced reconstruction)."""
    gen = torch.Generator().manual_seed(0)
    s = G.image_size
    x = torch.rand(faces, 3, s, s, generator=gen) * 2 - 1
    profile = load_profile("default")
    guard = magdr.Guard(G, parser=parser, profile=profile, device=device)
    dev = guard.device
    c = magdr.condition(guard.G, {"Blond_Hair": 1}, batch=faces).to(dev)
    xd = x.to(dev)
    never = replace(profile, threshold=float("inf"))
    always = replace(profile, threshold=float("-inf"))
    clean = magdr.Guard(guard.G, parser=guard.parser, profile=never, device=dev)
    forced = magdr.Guard(guard.G, parser=guard.parser, profile=always, device=dev)
    with torch.inference_mode():
        g = _per_face(lambda a, b: guard.G(a, b), xd, c, dev, repeats)
    out = {
        "device": str(dev),
        "image_size": s,
        "params_M": round(sum(p.numel() for p in G.parameters()) / 1e6, 2),
        "G_s_per_face": g,
        "guard_clean_s_per_face": _per_face(clean, xd, c, dev, repeats),
        "guard_reconstruct_s_per_face": _per_face(forced, xd, c, dev, 1),
    }
    out["ratio_clean"] = out["guard_clean_s_per_face"] / g
    out["ratio_reconstruct"] = out["guard_reconstruct_s_per_face"] / g
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--faces", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        parser = load_parser("default")
    except FileNotFoundError:
        parser = ParseNetParser(ParseNet())  # random weights cost the same
    results = {}
    for name, conv_dim, blocks in (
        ("stargan-full (64, 6 blocks)", 64, 6),
        ("stargan-small (16, 3 blocks)", 16, 3),
    ):
        G = StarGAN(conv_dim=conv_dim, c_dim=5, repeat_num=blocks, image_size=128)
        results[name] = time_generator(G, parser, args.device, args.faces, args.repeats)
    try:
        results["default"] = time_generator(
            magdr.load_generator("default"),
            magdr.load_parser("default"),
            args.device,
            args.faces,
            args.repeats,
        )
    except FileNotFoundError as e:
        results["default"] = {"skipped": str(e)}
    results["threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
