r"""A learned purifier P for disrupted faces, trained against one generator G.

Rec-Net (Algorithm 1) searches hand-made filters for the one that lowers S_final the most, and on
a small G the winner is nearly always the strongest smoothing of the grid: the cleaned output is
no better than a Gaussian blur. P instead *learns* what a disruption of G looks like, in the
manner of the high-level-representation-guided denoiser (Liao et al., CVPR 2018): it is trained
so that G's output on the purified face matches G's output on the clean one,

.. math::

    \mathcal{L} = \lVert G(P(\hat x), c) - G(x, c) \rVert_1
        + \beta \lVert P(\hat x) - x \rVert_1
        + \gamma \big(\lVert P(x) - x \rVert_1 + \lVert G(P(x), c) - G(x, c) \rVert_1\big),

the last term keeping clean faces as they are, so that a false alarm costs nothing
(``training.purifier`` trains it). :class:`magdr.Guard` tries P on a flagged face before
Rec-Net's search and keeps it when S_final of the purified face falls below the threshold
(the paper's check, Eq. 9); otherwise the search runs from P's output (where it lowered
S_final) or from the flagged face.

P is a two-level residual U-Net: it predicts a correction that is added to its input, and its
last convolution starts at zero, so an untrained P is the identity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from magdr.checkpoints import (
    WEIGHTS_DIR,
    CheckpointError,
    load_strict,
    read_state_dict,
    resolve_device,
    weights_digest,
)

DEFAULT_PURIFIER = WEIGHTS_DIR / "purifier.pt"

#: Purifiers shipped for the default G, by the name a profile or config may give instead of a
#: path: the full P that reconstructs, and a distilled one, small enough to run on every face
#: as the detector's consistency transform (``python -m training.purifier --teacher``).
SHIPPED = {"default": DEFAULT_PURIFIER, "detector": WEIGHTS_DIR / "purifier-detector.pt"}

#: The name chains give the purifier step (``GuardResult.chains``).
STEP_NAME = "purifier"


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class Purifier(nn.Module):
    """Residual U-Net purifier: ``P(x) = clamp(x + r(x), -1, 1)``.

    Args:
        width: channels at full resolution; ×2 and ×4 at the two coarser levels.

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1], H and W multiples of 4.
        - output: :math:`(B, 3, H, W)` in [-1, 1].

    Example:
        >>> P = Purifier(width=8)
        >>> P(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = int(width)
        self.width = w
        self.enc0 = _block(3, w)
        self.enc1 = _block(w, 2 * w, stride=2)
        self.enc2 = _block(2 * w, 4 * w, stride=2)
        self.dec1 = _block(4 * w + 2 * w, 2 * w)
        self.dec0 = _block(2 * w + w, w)
        self.head = nn.Conv2d(w, 3, 3, 1, 1)
        # Zero correction at start: an untrained purifier changes nothing.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        #: Run in channels-last memory (set by :func:`load_purifier` with the weights): the same
        #: numbers, 1.4× faster on the CPU, measured on batches of 8 128² faces.
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.channels_last:
            return self._forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        up = F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], 1))
        up = F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False)
        d0 = self.dec0(torch.cat([up, e0], 1))
        return (x + self.head(d0)).clamp(-1, 1)


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def purifier_path(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: a path, or the name of a shipped one (``SHIPPED``)."""
    return SHIPPED.get(str(path), Path(path))


def load_purifier(path: str | Path = "default", device: str | torch.device = "cpu") -> Purifier:
    """A trained :class:`Purifier` from a checkpoint path, or a shipped one's name (``SHIPPED``).

    The JSON file beside the checkpoint (same name, ``.json``) gives its ``width`` and what it
    was trained against; it is kept in ``P.meta``, the file's path in ``P.source``.
    Checkpoints load with ``weights_only=True`` and strict keys (:mod:`magdr.checkpoints`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is unreadable or does not hold a purifier.
    """
    p = purifier_path(path)
    meta: dict[str, Any] = {}
    if _meta_path(p).is_file():
        meta = json.loads(_meta_path(p).read_text())
    sd = read_state_dict(p, "purifier checkpoint")
    width = int(meta.get("width", sd["enc0.0.weight"].shape[0] if "enc0.0.weight" in sd else 0))
    if width <= 0:
        raise CheckpointError(f"{p}: not a purifier checkpoint (no enc0.0.weight)")
    P = Purifier(width)
    load_strict(P, sd, str(p), f"Purifier(width={width})")
    P.meta = meta  # type: ignore[assignment]
    P.source = p.resolve()  # type: ignore[assignment]
    P.channels_last = True
    return P.to(resolve_device(device), memory_format=torch.channels_last).eval()


def save_purifier(P: Purifier, path: str | Path, **meta: Any) -> None:
    """Write P's tensors (loadable with ``weights_only=True``) and its JSON metadata beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in P.state_dict().items()}
    torch.save(sd, path)
    _meta_path(path).write_text(json.dumps({"width": P.width, **meta}, indent=1) + "\n")


def purifier_for(
    G: nn.Module, purifier: nn.Module | str | Path | None, device: str | torch.device = "cpu"
) -> nn.Module | None:
    """The purifier a guard of G uses: ``purifier`` itself, loaded, or resolved from ``"auto"``.

    ``"auto"`` takes the shipped purifier when it was trained against G's very weights (its
    ``generator_digest``), and none otherwise: a purifier learns one generator's disruptions,
    and another G's guard falls back to Rec-Net alone.
    """
    if purifier is None or str(purifier) == "none":
        return None
    if isinstance(purifier, nn.Module):
        return purifier.to(resolve_device(device)).eval()
    if str(purifier) == "auto":
        if not _meta_path(DEFAULT_PURIFIER).is_file():
            return None
        trained_for = json.loads(_meta_path(DEFAULT_PURIFIER).read_text()).get("generator_digest")
        if trained_for != weights_digest(G):
            return None
        purifier = "default"
    return load_purifier(purifier, device)
