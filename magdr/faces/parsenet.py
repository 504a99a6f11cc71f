"""ParseNet: the small default face parser (a 4-level U-Net), trained by ``training/parser.py``.

It outputs the 19 BiSeNet / CelebAMask-HQ classes (:data:`magdr.faces.regions.BISENET_CLASSES`)
so it is a drop-in for BiSeNet's ``79999_iter.pth`` at a fraction of the cost. The network works
at 128×128 (the size it was trained on): other input sizes are resized to 128 and the logits
resized back to the input's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from magdr.check import check_shape
from magdr.faces.regions import BISENET_CLASSES

WORK_SIZE = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    """conv3-BN-ReLU twice (key layout ``{0,1,3,4}``)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ParseNet(nn.Module):
    """U-Net face parser: ``[B,3,H,W]`` in [-1,1] -> ``[B,19,H,W]`` logits (BiSeNet order).

    Args:
        width: channels of the first level; level k has ``width * 2**k`` channels.
        depth: number of levels (``depth - 1`` 2× downsamplings).
        num_classes: output classes (19).

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1]; any H, W (resized to 128 internally).
        - output: :math:`(B, 19, H, W)` logits; ``softmax(1)`` gives the class probabilities.

    Example:
        >>> net = ParseNet(width=4, depth=3)
        >>> net(torch.zeros(2, 3, 32, 40)).shape
        torch.Size([2, 19, 32, 40])
    """

    def __init__(self, width: int = 16, depth: int = 4, num_classes: int = len(BISENET_CLASSES)):
        super().__init__()
        self.width, self.depth, self.num_classes = width, depth, num_classes
        chans = [width * 2**k for k in range(depth)]
        self.enc = nn.ModuleList(
            [_block(3 if k == 0 else chans[k - 1], chans[k]) for k in range(depth)]
        )
        self.dec = nn.ModuleList(
            [_block(chans[k + 1] + chans[k], chans[k]) for k in range(depth - 1)]
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_shape(x, ["B", "3", "H", "W"], "x")
        h, w = x.shape[-2:]
        resized = (h, w) != (WORK_SIZE, WORK_SIZE)
        if resized:
            x = F.interpolate(x, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False)
        skips = []
        for k, blk in enumerate(self.enc):
            x = blk(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for k in reversed(range(self.depth - 1)):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.dec[k](torch.cat([x, skips[k]], 1))
        out = self.head(x)
        if resized:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ParseNet:
        """Build a ParseNet whose width, depth and class count are inferred from ``sd``."""
        width = sd["enc.0.0.weight"].shape[0]
        depth = len({k.split(".")[1] for k in sd if k.startswith("enc.")})
        net = cls(width=width, depth=depth, num_classes=sd["head.weight"].shape[0])
        net.load_state_dict(sd, strict=True)
        return net
