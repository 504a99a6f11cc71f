"""CycleGAN ResNet generator in the layout of junyanz/pytorch-CycleGAN-and-pix2pix (DESIGN §4).

``latest_net_G_A.pth`` of ``--netG resnet_9blocks --norm instance``: one ``nn.Sequential``
``model``: ReflectionPad(3), conv7 (3 -> ngf), IN, ReLU; two stride-2 conv3 (ngf -> 2ngf ->
4ngf), IN, ReLU; ``n_blocks`` ``ResnetBlock`` (``model.10.conv_block.{1,5}`` convolutions behind
reflection pads; ``{1,6}`` when trained with dropout); two stride-2 transposed conv3 with
``output_padding=1``, IN, ReLU; ReflectionPad(3), conv7 -> 3; tanh. InstanceNorm has no affine
parameters, so every convolution has a bias.

InstanceNorm mode: per-image statistics always (as the original, whose InstanceNorm keeps no
running statistics). Checkpoints saved in the months when the original set
``track_running_stats=True`` hold ``running_mean``/``running_var`` buffers; they load here and are
never used, which is what the original's own loader does by deleting them. Dropout, when present,
is the identity (the original's ``--eval`` test mode), so outputs are deterministic.
"""

from __future__ import annotations

import torch
from torch import nn

from magdr.models.base import Generator
from magdr.models.stargan import InstanceNorm


class ResnetBlock(nn.Module):
    """Pad-conv3-IN-ReLU(-Dropout)-pad-conv3-IN with an identity skip (``conv_block.*``)."""

    def __init__(self, dim: int, use_dropout: bool, running_stats: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNorm(dim, affine=False, track_running_stats=running_stats),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Identity())  # nn.Dropout(0.5) in training; no parameters
        layers += [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNorm(dim, affine=False, track_running_stats=running_stats),
        ]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.conv_block(x)


class CycleGAN(Generator):
    """CycleGAN G(x): one fixed translation (here: face replacement), no condition.

    Args:
        ngf: width of the first layer (64 in the paper).
        n_blocks: residual blocks (9 for ``resnet_9blocks``, 6 for ``resnet_6blocks``).
        image_size: the side G was trained on (256).
        use_dropout: whether the blocks had dropout (changes the key indices only).
        running_stats: whether the InstanceNorm layers hold (unused) running-stat buffers.

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1], H and W multiples of 4.
        - c: ignored, may be ``None``.
        - output: :math:`(B, 3, H, W)` in [-1, 1].

    Example:
        >>> G = CycleGAN(ngf=8, n_blocks=1)
        >>> G(torch.zeros(2, 3, 16, 16), None).shape
        torch.Size([2, 3, 16, 16])
    """

    task = "replace"
    c_dim = 0

    def __init__(
        self,
        ngf: int = 64,
        n_blocks: int = 9,
        image_size: int = 256,
        use_dropout: bool = False,
        running_stats: bool = False,
    ) -> None:
        super().__init__()
        self.ngf, self.n_blocks, self.image_size = ngf, n_blocks, image_size
        self.use_dropout, self.running_stats = use_dropout, running_stats
        self.attributes, self.neutral, self.attribute_targets = [], [], {}

        def norm(d: int) -> InstanceNorm:
            return InstanceNorm(d, affine=False, track_running_stats=running_stats)

        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), norm(ngf)]
        layers.append(nn.ReLU(True))
        d = ngf
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, 3, stride=2, padding=1), norm(d * 2), nn.ReLU(True)]
            d *= 2
        layers += [ResnetBlock(d, use_dropout, running_stats) for _ in range(n_blocks)]
        for _ in range(2):
            up = nn.ConvTranspose2d(d, d // 2, 3, stride=2, padding=1, output_padding=1)
            layers += [up, norm(d // 2), nn.ReLU(True)]
            d //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(d, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        return self.model(x)

    def features(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Φ_l: the maps after the downsampling and after each residual block."""
        h, feats = x, []
        for i, layer in enumerate(self.model):
            h = layer(h)
            if i == 9 or isinstance(layer, ResnetBlock):
                feats.append(h)
        return feats

    @staticmethod
    def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, object]:
        """Constructor arguments inferred from a checkpoint's keys and shapes.

        Raises:
            KeyError: the checkpoint has no first convolution ``model.1.weight``.
        """
        blocks = {k.split(".")[1] for k in sd if k.startswith("model.") and ".conv_block." in k}
        return {
            "ngf": sd["model.1.weight"].shape[0],
            "n_blocks": len(blocks),
            "use_dropout": any(".conv_block.6.weight" in k for k in sd),
            "running_stats": any(k.endswith(".running_mean") for k in sd),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **kw: object) -> CycleGAN:
        """Build a CycleGAN whose layout is inferred from the checkpoint, strictly loaded."""
        G = cls(**{**cls.config_from_state_dict(sd), **kw})  # type: ignore[arg-type]
        G.load_state_dict(sd, strict=True)
        return G
