"""What every guarded generator G(x, c) exposes (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from magdr.faces.regions import REGIONS, TARGETS, region_indicator

TASKS = ("edit", "reenact", "replace")


class Generator(nn.Module):
    """Base class of the image-to-image face generators MagDR guards.

    Subclasses set the class attributes below and implement :meth:`forward` and
    :meth:`features`. Images are RGB, channels-first, ``[B,3,H,W]`` in [-1, 1]; conditions are
    ``[B, c_dim]`` (``c_dim == 0`` for unconditional models such as CycleGAN, whose ``c`` is
    ignored and may be ``None``).

    Attributes:
        image_size: side of the square input G was trained on.
        c_dim: length of the condition vector.
        attributes: name of each condition entry (``len == c_dim``).
        task: ``"edit"`` | ``"reenact"`` | ``"replace"``.
        neutral: the condition value an attribute takes when :func:`magdr.condition` is not
            told it (``len == c_dim``).
        attribute_targets: attribute name -> key of :data:`magdr.faces.regions.TARGETS`: the
            region that attribute edits.
    """

    image_size: int = 128
    c_dim: int = 0
    attributes: list[str] = []
    task: str = "edit"
    neutral: list[float] = []
    attribute_targets: dict[str, str] = {}

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError

    def features(self, x: torch.Tensor, c: torch.Tensor | None) -> list[torch.Tensor]:
        """Internal maps Φ_l(x, c) used by the feature-level distances (paper §3.2.1)."""
        raise NotImplementedError

    def target_regions(self, c: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Target attribute region M_c of each item as a 0/1 vector over ``REGIONS``.

        An attribute is a target when its value differs from :attr:`neutral`; for tasks without
        attributes (reenactment, replacement) the task's region is the target.

        Args:
            c: conditions :math:`(B, c_dim)`, or ``None`` for unconditional models.
            batch: B when ``c`` is ``None``.

        Returns:
            :math:`(B, N)` float, ``N = len(REGIONS)``.
        """
        b = c.shape[0] if c is not None else (batch or 1)
        device = c.device if c is not None else None
        if self.task != "edit" or c is None or self.c_dim == 0:
            key = {"reenact": "reenact", "replace": "replace"}.get(self.task, "face+hair")
            return region_indicator(TARGETS[key]).to(device).expand(b, -1).clone()
        neutral = torch.tensor(self.neutral, dtype=c.dtype, device=c.device)
        changed = (c - neutral).abs() > 1e-3  # [B, c_dim]
        out = torch.zeros(b, len(REGIONS), device=c.device)
        for j, name in enumerate(self.attributes):
            key = self.attribute_targets.get(name, "face+hair")
            ind = region_indicator(TARGETS[key]).to(c.device)
            out = torch.maximum(out, changed[:, j : j + 1].float() * ind)
        # An item asked for no change still has a target: the model's broadest edit region.
        none = out.sum(1) == 0
        if none.any():
            out[none] = region_indicator(TARGETS["face+hair"]).to(c.device)
        return out


def condition(
    G: Generator, values: Mapping[str, float] | None = None, batch: int = 1
) -> torch.Tensor:
    """Condition tensor for ``G`` from attribute names (DESIGN §3).

    Attributes not named take ``G.neutral``. For CelebA hair colours, which are exclusive,
    naming one hair colour with a value > 0.5 sets the other hair colours to 0.

    Args:
        G: the generator.
        values: ``{attribute: value}``; unknown names raise ``KeyError`` naming the known ones.
        batch: B.

    Returns:
        :math:`(B, c_dim)` float32 on G's device.
    """
    values = dict(values or {})
    unknown = [k for k in values if k not in G.attributes]
    if unknown:
        raise KeyError(f"unknown attributes {unknown} for this generator; known: {G.attributes}")
    vec = list(map(float, G.neutral)) if G.neutral else [0.0] * G.c_dim
    hair = [a for a in G.attributes if a.endswith("_Hair") and a != "Bald_Hair"]
    if any(k in hair and float(v) > 0.5 for k, v in values.items()):
        for a in hair:
            vec[G.attributes.index(a)] = 0.0
    for k, v in values.items():
        vec[G.attributes.index(k)] = float(v)
    try:
        device = next(G.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.tensor(vec, dtype=torch.float32, device=device).expand(batch, -1).clone()
