"""StarGAN generator in the exact layout of yunjey/stargan's ``{iter}-G.ckpt`` (DESIGN §4).

Layout: one ``nn.Sequential`` ``main``: conv7 (3+c_dim -> d), IN, ReLU; two stride-2 conv4
downsamplings (d -> 2d -> 4d), each IN + ReLU; ``repeat_num`` residual blocks (``main.k.main.*``);
two stride-2 transposed conv4 upsamplings; conv7 -> 3; tanh. No conv has a bias; every
InstanceNorm is affine and tracks running statistics, so the checkpoint holds
``running_mean``/``running_var``/``num_batches_tracked`` buffers.

InstanceNorm mode: StarGAN's own test code never calls ``G.eval()``, so the published outputs
are made with *per-image* statistics (PyTorch's train-mode InstanceNorm), not with the running
statistics stored in the checkpoint. :class:`InstanceNorm` reproduces exactly that in every
mode: it always normalises with the input's own statistics and never updates the buffers, so
``eval()``/``train()`` give the original outputs and guarding a frame cannot change the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from magdr.models.base import Generator

CELEBA_ATTRIBUTES = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]


class InstanceNorm(nn.InstanceNorm2d):
    """InstanceNorm that always uses per-image statistics and never updates its buffers.

    ``affine`` and ``track_running_stats`` only decide which parameters and buffers exist, so
    that a checkpoint's keys load strictly (StarGAN: both True; GANimation: affine; CycleGAN:
    neither, or running stats in checkpoints saved by some old versions).
    """

    def __init__(
        self, num_features: int, affine: bool = True, track_running_stats: bool = True
    ) -> None:
        super().__init__(num_features, affine=affine, track_running_stats=track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class ResidualBlock(nn.Module):
    """conv3-IN-ReLU-conv3-IN with an identity skip (key layout ``main.{0,1,3,4}``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            InstanceNorm(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            InstanceNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.main(x)


class StarGAN(Generator):
    """StarGAN G(x, c): the condition is tiled over the image and concatenated as channels.

    Args:
        conv_dim: width of the first layer (64 in the paper).
        c_dim: condition length (5 for StarGAN's CelebA attributes).
        repeat_num: residual blocks (6 in the paper).
        image_size: the side G was trained on (128 in the paper).
        attributes: names of the condition entries; CelebA's five by default when ``c_dim == 5``.
        neutral: condition values for attributes :func:`magdr.condition` is not told.

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1], H and W multiples of 4.
        - c: :math:`(B, c_dim)`.
        - output: :math:`(B, 3, H, W)` in [-1, 1].

    Example:
        >>> G = StarGAN(conv_dim=8, c_dim=5, repeat_num=1)
        >>> G(torch.zeros(2, 3, 16, 16), torch.zeros(2, 5)).shape
        torch.Size([2, 3, 16, 16])
    """

    task = "edit"

    def __init__(
        self,
        conv_dim: int = 64,
        c_dim: int = 5,
        repeat_num: int = 6,
        image_size: int = 128,
        attributes: list[str] | None = None,
        neutral: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.conv_dim, self.repeat_num, self.image_size, self.c_dim = (
            conv_dim, repeat_num, image_size, c_dim,
        )  # fmt: skip
        if attributes is None:
            attributes = CELEBA_ATTRIBUTES if c_dim == 5 else [f"attr{i}" for i in range(c_dim)]
        if len(attributes) != c_dim:
            raise ValueError(f"attributes: expected {c_dim} names, got {len(attributes)}")
        self.attributes = list(attributes)
        self.neutral = list(neutral) if neutral is not None else [0.0] * c_dim
        self.attribute_targets = {
            a: ("hair" if a.endswith("_Hair") else "face+hair") for a in self.attributes
        }
        layers: list[nn.Module] = [
            nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False),
            InstanceNorm(conv_dim),
            nn.ReLU(inplace=True),
        ]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, 4, 2, 1, bias=False), InstanceNorm(d * 2), nn.ReLU(True)]
            d *= 2
        layers += [ResidualBlock(d) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False),
                InstanceNorm(d // 2),
                nn.ReLU(inplace=True),
            ]
            d //= 2
        layers += [nn.Conv2d(d, 3, 7, 1, 3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def _input(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.c_dim == 0:
            return x
        if c is None or c.shape != (x.shape[0], self.c_dim):
            got = None if c is None else list(c.shape)
            raise ValueError(f"c: expected shape [{x.shape[0]},{self.c_dim}], got {got}")
        tiled = c.to(x)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([x, tiled], dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return self.main(self._input(x, c))

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
    def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, int]:
        """``conv_dim``, ``c_dim`` and ``repeat_num`` inferred from a checkpoint's shapes."""
        first = sd["main.0.weight"]
        conv_dim, c_dim = first.shape[0], first.shape[1] - 3
        repeat_num = len({k.split(".")[1] for k in sd if k.count(".") >= 3 and ".main." in k})
        return {"conv_dim": conv_dim, "c_dim": c_dim, "repeat_num": repeat_num}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **kw: object) -> StarGAN:
        """Build a StarGAN whose widths and depth are inferred from the checkpoint's shapes."""
        G = cls(**cls.config_from_state_dict(sd), **kw)  # type: ignore[arg-type]
        G.load_state_dict(sd, strict=True)
        return G
