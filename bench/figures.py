"""Figures 1 and 4 (the paper's image grids) on faces that may be redistributed.

CelebA's faces may not be shown outside the run, so the grids are made from the faces of the
demo clip bundled with the daemon (``daemon/assets/demo.mp4``, MIT): frames spread over the clip
are decoded with PyAV, cut by the daemon's own face path (:func:`magdr.faces.locate`), attacked
by PGD (Ruiz et al.'s ε 0.05) under the daemon's default edit, and reconstructed by each defence.
Both PNGs are committed beside the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import report
from bench.baselines import reconstructions
from bench.common import Bench
from bench.reconstruction import MAGDR, NO_DEFENCE, PURIFIER, RECNET

DEMO_CLIP = Path(__file__).resolve().parents[1] / "daemon" / "assets" / "demo.mp4"
#: The daemon's default ``[model] condition``.
EDIT = {"Blond_Hair": 1.0}


def demo_faces(size: int, n: int = 4, clip: Path = DEMO_CLIP) -> torch.Tensor:
    """The largest face of ``n`` frames spread over the clip, :math:`(n', 3, size, size)`."""
    import av

    from magdr.faces.locate import crop_faces, locate_faces

    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
    faces = []
    for i in picks:
        boxes = locate_faces(frames[i], max_faces=1)
        if boxes:
            faces.append(crop_faces(frames[i], boxes, size)[0])
    if not faces:
        raise RuntimeError(f"{clip}: no face found in {n} frames")
    return torch.cat(faces)


def make(bench: Bench, out: Path, rec_net: Any | None, ae: Any | None, seed: int = 0) -> list[str]:
    """Write ``fig1_magdr.png`` and ``fig4_defences.png`` into ``out``; return their names."""
    import magdr
    from magdr import attacks

    G = bench.G
    x = demo_faces(int(getattr(G, "image_size", 128))).to(bench.device)
    c = magdr.condition(G, EDIT, batch=len(x)) if getattr(G, "c_dim", 0) else None
    gen = torch.Generator(device=bench.device).manual_seed(seed)
    x_adv = attacks.pgd(G, x, c, generator=gen)
    r = bench.guard(x_adv, c)
    rows = [
        ("input x", x),
        ("G(x)", bench.generate(x, c)),
        ("disrupted input x̂", x_adv),
        ("disrupted output G(x̂)", bench.generate(x_adv, c)),
        ("reconstructed input x*", r.purified),
        ("recovered output G(x*)", r.output),
    ]
    names = [
        report.grid(
            out / "fig1_magdr.png", rows, "MagDR on PGD-disrupted faces of the demo clip (Fig. 1)"
        )
    ]
    # Figure 4: the first face through every defence.
    x1, a1, c1 = x[:1], x_adv[:1], None if c is None else c[:1]
    cols: dict[str, torch.Tensor] = {NO_DEFENCE: a1, MAGDR: r.purified[:1]}
    if rec_net is not None:
        cols[RECNET] = rec_net(a1, c1).purified
    purifier = getattr(bench.guard, "purifier", None)
    if purifier is not None:
        with torch.no_grad():
            cols[PURIFIER] = purifier(a1)
    g = torch.Generator().manual_seed(seed)
    for name, fn in reconstructions(ae).items():
        with torch.no_grad():
            cols[name] = fn(a1.cpu(), g).to(a1)
    x_star = torch.cat([x1, *cols.values()])
    c_rep = None if c1 is None else c1.repeat(len(x_star), 1)
    names.append(
        report.grid(
            out / "fig4_defences.png",
            [("x*", x_star), ("G(x*)", bench.generate(x_star, c_rep))],
            "One PGD-disrupted demo-clip face through each defence (Fig. 4)",
            col_labels=["clean x", *cols],
        )
    )
    return names
