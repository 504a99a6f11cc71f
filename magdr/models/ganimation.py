"""GANimation generator in the layouts of its two public code bases (DESIGN §4).

* ``"original"``: albertpumarola/GANimation ``networks/generator_wasserstein_gan.py``, saved as
  ``net_epoch_N_id_G.pth``: trunk ``main.*``, colour head ``img_reg.0.weight``, attention head
  ``attetion_reg.0.weight`` (sic). InstanceNorm is affine; checkpoints saved with PyTorch < 0.4
  also carry ``running_mean``/``running_var`` buffers.
* ``"ruiz"``: the vipermu/ganimation fork used by Ruiz et al. (natanielruiz/disrupting-deepfakes
  ``ganimation/model.py``), saved as ``{iter}-G.ckpt``: the same trunk with InstanceNorm
  ``track_running_stats=True``, heads ``im_reg`` and ``im_att``, and four debugging aliases
  ``debug1..debug4`` of prefixes of ``main`` whose keys duplicate ``main.*`` (the loader checks
  they are identical and drops them).

Trunk (as StarGAN): conv7 (3+c -> d), IN, ReLU; two stride-2 conv4 (d -> 2d -> 4d), IN, ReLU;
``repeat_num`` residual blocks; two stride-2 transposed conv4 back to d, IN, ReLU; no conv has a
bias. Heads: conv7 -> 3, tanh (colour C) and conv7 -> 1, sigmoid (attention A). The output keeps
the input where A is near 1 (both code bases)::

    y = A * x + (1 - A) * C

The condition is 17 action-unit intensities in [0, 1] (OpenFace intensities 0..5 divided by 5),
tiled over the image and concatenated like StarGAN's.

InstanceNorm mode: as for StarGAN (see :mod:`magdr.models.stargan`), normalisation always uses
per-image statistics. Ruiz et al.'s code never calls ``G.eval()``; the original code does, but
its InstanceNorm keeps no running statistics (PyTorch >= 0.4) or ignores them (0.3), so both
produce per-image statistics and this module reproduces them in ``eval()`` and ``train()``.
"""

from __future__ import annotations

import torch
from torch import nn

from magdr.models.base import Generator
from magdr.models.stargan import InstanceNorm

#: OpenFace action units in the order of GANimation's 17-dim condition (``aus_openface.pkl``).
ACTION_UNITS = [
    "AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU10", "AU12",
    "AU14", "AU15", "AU17", "AU20", "AU23", "AU25", "AU26", "AU45",
]  # fmt: skip

#: variant -> (colour head, attention head) module names.
HEADS = {"original": ("img_reg", "attetion_reg"), "ruiz": ("im_reg", "im_att")}


class ResidualBlock(nn.Module):
    """conv3-IN-ReLU-conv3-IN with an identity skip (key layout ``main.{0,1,3,4}``)."""

    def __init__(self, dim: int, running_stats: bool) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            InstanceNorm(dim, affine=True, track_running_stats=running_stats),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            InstanceNorm(dim, affine=True, track_running_stats=running_stats),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.main(x)


class GANimation(Generator):
    """GANimation G(x, c): attention-masked colour regression conditioned on action units.

    Args:
        conv_dim: width of the first layer (64 in the paper).
        c_dim: condition length (17 action units).
        repeat_num: residual blocks (6 in the paper).
        image_size: the side G was trained on (128 in both code bases).
        variant: ``"original"`` (albertpumarola) or ``"ruiz"`` (vipermu fork): head names.
        running_stats: whether the InstanceNorm layers hold running-stat buffers (``"ruiz"``
            checkpoints and ``"original"`` ones saved with PyTorch < 0.4); they are never used.
        attributes: names of the condition entries; :data:`ACTION_UNITS` when ``c_dim == 17``.
        neutral: condition values for action units :func:`magdr.condition` is not told (0).

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1], H and W multiples of 4.
        - c: :math:`(B, c_dim)` in [0, 1].
        - output: :math:`(B, 3, H, W)` in [-1, 1].

    Example:
        >>> G = GANimation(conv_dim=8, repeat_num=1)
        >>> G(torch.zeros(2, 3, 16, 16), torch.zeros(2, 17)).shape
        torch.Size([2, 3, 16, 16])
    """

    task = "reenact"

    def __init__(
        self,
        conv_dim: int = 64,
        c_dim: int = 17,
        repeat_num: int = 6,
        image_size: int = 128,
        variant: str = "original",
        running_stats: bool | None = None,
        attributes: list[str] | None = None,
        neutral: list[float] | None = None,
    ) -> None:
        super().__init__()
        if variant not in HEADS:
            raise ValueError(f"variant: expected one of {list(HEADS)}, got {variant!r}")
        if running_stats is None:
            running_stats = variant == "ruiz"
        self.conv_dim, self.c_dim, self.repeat_num, self.image_size = (
            conv_dim, c_dim, repeat_num, image_size,
        )  # fmt: skip
        self.variant, self.running_stats = variant, running_stats
        if attributes is None:
            attributes = ACTION_UNITS if c_dim == 17 else [f"AU{i}" for i in range(c_dim)]
        if len(attributes) != c_dim:
            raise ValueError(f"attributes: expected {c_dim} names, got {len(attributes)}")
        self.attributes = list(attributes)
        self.neutral = list(neutral) if neutral is not None else [0.0] * c_dim
        self.attribute_targets = {a: "reenact" for a in self.attributes}

        def norm(d: int) -> InstanceNorm:
            return InstanceNorm(d, affine=True, track_running_stats=running_stats)

        layers: list[nn.Module] = [
            nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False),
            norm(conv_dim),
            nn.ReLU(inplace=True),
        ]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, 4, 2, 1, bias=False), norm(d * 2), nn.ReLU(True)]
            d *= 2
        layers += [ResidualBlock(d, running_stats) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False), norm(d // 2)]
            layers += [nn.ReLU(inplace=True)]
            d //= 2
        self.main = nn.Sequential(*layers)
        self._color_name, self._mask_name = HEADS[variant]
        color = nn.Sequential(nn.Conv2d(d, 3, 7, 1, 3, bias=False), nn.Tanh())
        mask = nn.Sequential(nn.Conv2d(d, 1, 7, 1, 3, bias=False), nn.Sigmoid())
        self.add_module(self._color_name, color)
        self.add_module(self._mask_name, mask)

    def _input(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is None or c.shape != (x.shape[0], self.c_dim):
            got = None if c is None else list(c.shape)
            raise ValueError(f"c: expected shape [{x.shape[0]},{self.c_dim}], got {got}")
        tiled = c.to(x)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([x, tiled], dim=1)

    def color_and_mask(
        self, x: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two heads: colour C :math:`(B, 3, H, W)` in [-1, 1], attention A in [0, 1].

        Returns:
            ``(C, A)`` with A of shape :math:`(B, 1, H, W)`.
        """
        h = self.main(self._input(x, c))
        return getattr(self, self._color_name)(h), getattr(self, self._mask_name)(h)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """``A * x + (1 - A) * C``: the input kept where the attention A is near 1."""
        color, mask = self.color_and_mask(x, c)
        return mask * x + (1 - mask) * color

    def features(self, x: torch.Tensor, c: torch.Tensor | None) -> list[torch.Tensor]:
        """Φ_l: the maps after the downsampling and after each residual block."""
        h = self._input(x, c)
        feats = []
        for i, layer in enumerate(self.main):
            h = layer(h)
            if i == 8 or isinstance(layer, ResidualBlock):
                feats.append(h)
        return feats

    @staticmethod
    def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, object]:
        """Constructor arguments inferred from a checkpoint's keys and shapes.

        Raises:
            KeyError: the checkpoint has neither head pair or no first convolution.
        """
        variants = [v for v, heads in HEADS.items() if any(f"{h}.0.weight" in sd for h in heads)]
        if len(variants) != 1:
            raise KeyError(f"expected the heads of exactly one of {HEADS}, found {variants}")
        first = sd["main.0.weight"]
        blocks = {k.split(".")[1] for k in sd if k.startswith("main.") and ".main." in k}
        return {
            "conv_dim": first.shape[0],
            "c_dim": first.shape[1] - 3,
            "repeat_num": len(blocks),
            "variant": variants[0],
            "running_stats": any(k.endswith(".running_mean") for k in sd),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **kw: object) -> GANimation:
        """Build a GANimation whose layout is inferred from the checkpoint, strictly loaded.

        ``debugN.*`` aliases of ``main.*`` (``"ruiz"`` checkpoints) must equal their ``main``
        counterpart and are dropped.
        """
        G = cls(**{**cls.config_from_state_dict(sd), **kw})  # type: ignore[arg-type]
        G.load_state_dict(drop_debug_aliases(sd), strict=True)
        return G


def drop_debug_aliases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``debug1..debug4`` duplicates of ``main.*`` from a ``"ruiz"`` checkpoint.

    In the fork, ``debugN`` are ``nn.Sequential`` views of prefixes of the same layer list as
    ``main``, so ``debugN.i.rest`` is the very tensor ``main.i.rest``.

    Raises:
        ValueError: a ``debugN`` key has no ``main`` counterpart or a different value.
    """
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in ("debug1", "debug2", "debug3", "debug4"):
            twin = sd.get(f"main.{rest}")
            if twin is None or twin.shape != v.shape or not torch.equal(twin, v):
                raise ValueError(f"{k} does not alias main.{rest}: not a GANimation checkpoint")
            continue
        out[k] = v
    return out
