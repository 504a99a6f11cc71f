"""What the operator page shows of a flagged face: the guard's work, side by side.

Per disrupted face of a guard call: the input crop x̂, G's output on it G(x̂, c) (what the
attacker wanted the user to see), the purified input x*, G's output after G(x*, c), and x̂ with
the regions the distortion detector flagged (V_i, Eq. 5) tinted red. G(x̂, c) and the region maps
cost one more pass of G and of the parser, for the flagged faces only, beside the hundreds of G
passes their Rec-Net search took.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from magdr.faces.regions import REGIONS

#: the tint of flagged regions in the ``regions`` picture, RGB in [-1, 1].
FLAG_TINT = (1.0, -1.0, -1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """An image :math:`(3, H, W)` in [-1, 1] as ``(H, W, 3)`` uint8 RGB."""
    pix = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return np.ascontiguousarray(pix.permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def flagged_details(
    guard: Any, x: torch.Tensor, c: torch.Tensor | None, r: Any
) -> list[dict[str, Any] | None]:
    """Per face of one guard call, the side by side of a flagged face (None where clean).

    Args:
        guard: the :class:`magdr.Guard` that made ``r``.
        x: the faces given to it, :math:`(B, 3, S, S)` in [-1, 1].
        c: their conditions :math:`(B, C)`.
        r: its :class:`magdr.GuardResult`.

    Returns:
        Per face, None or ``{"input", "output_before", "purified", "output", "regions"}``
        (``(S, S, 3)`` uint8 RGB pictures) with ``flagged_regions`` (names from
        ``magdr.faces.regions.REGIONS``) and ``score_after`` (S_final of x*).
    """
    out: list[dict[str, Any] | None] = [None] * x.shape[0]
    idx = [i for i in range(x.shape[0]) if bool(r.disrupted[i])]
    if not idx:
        return out
    xs = x[idx]
    before = guard.G(xs, c[idx] if c is not None else None)
    flags = r.flags[idx].to(xs.device, xs.dtype)
    # soft region maps weighted by V_i: how much of each pixel belongs to a flagged region
    shade = (guard.regions(xs) * flags[:, :, None, None]).sum(1, keepdim=True).clamp(0, 1) * 0.6
    tint = torch.tensor(FLAG_TINT, device=xs.device, dtype=xs.dtype).view(1, 3, 1, 1)
    marked = xs * (1 - shade) + tint * shade
    for j, i in enumerate(idx):
        out[i] = {
            "input": to_uint8(xs[j]),
            "output_before": to_uint8(before[j]),
            "purified": to_uint8(r.purified[i]),
            "output": to_uint8(r.output[i]),
            "regions": to_uint8(marked[j]),
            "flagged_regions": [REGIONS[k] for k in range(len(REGIONS)) if bool(r.flags[i, k])],
            "score_after": float(r.score_after[i]),
        }
    return out
