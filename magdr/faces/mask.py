"""Paste-back masks: where G's result goes back into the frame.

As face-editing tools do it (FaceFusion's ``create_mask``), masks compose by an element-wise
minimum, and the static one is cached:

- :func:`window_mask`: a raised-cosine disc inside the crop, 1 at its middle and 0 well before
  its square border, so nothing is ever pasted in the crop's square shape;
- :func:`region_mask`: the regions the edit targets, M_c of the paper (Eq. 4's target region,
  :func:`magdr.faces.regions.target_mask`) from the face parser, feathered: the hair for a
  hair-colour edit, face and hair for age or gender, the face for reenactment and replacement.
  Where G only reconstructs (the eyes and mouth under a hair-colour edit), nothing is pasted.

Masks are ``[B, 1, S, S]`` in [0, 1] over crops ``[B, 3, S, S]`` in [-1, 1].
"""

from __future__ import annotations

from functools import lru_cache

import torch

from magdr.faces.regions import target_mask
from magdr.transforms import gaussian_blur

#: Feathering of the region mask: Gaussian σ as a fraction of the crop side (2 px of 128). The
#: parser's edges are soft already; this hides where they wobble from frame to frame.
REGION_FEATHER = 0.016


@lru_cache(maxsize=16)
def _disc(size: int, inner: float, outer: float) -> torch.Tensor:
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    r = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    ramp = ((outer - r) / (outer - inner)).clamp(0, 1)
    return (0.5 - 0.5 * torch.cos(torch.pi * ramp))[None, None]


def window_mask(size: int, inner: float = 0.36, outer: float = 0.49) -> torch.Tensor:
    """A soft disc: 1 within ``inner`` of the crop's side from its centre, 0 beyond ``outer``.

    ``outer`` is capped a pixel inside the border, so the border is 0 at any size.

    Returns:
        ``[1, 1, size, size]`` (cached: do not modify it in place).
    """
    outer = min(float(outer), 0.5 - 1.0 / size)
    return _disc(int(size), min(float(inner), outer - 1.0 / size), outer)


def region_mask(
    regions: torch.Tensor, targets: torch.Tensor, feather: float = REGION_FEATHER
) -> torch.Tensor:
    """The edit's target regions, feathered, inside :func:`window_mask`.

    Args:
        regions: ``[B, N, S, S]`` soft attribute regions (``Guard.regions``).
        targets: ``[B, N]`` 0/1 from ``Generator.target_regions(c)``.
        feather: Gaussian σ as a fraction of ``S``.

    Returns:
        ``[B, 1, S, S]`` in [0, 1].
    """
    m = gaussian_blur(target_mask(regions, targets).clamp(0, 1), feather * regions.shape[-1])
    return torch.minimum(m, window_mask(regions.shape[-1]).to(m))
