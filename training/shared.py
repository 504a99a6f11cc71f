"""What several training scripts share: weights and runs paths, region maps, the attribute net.

``stargan`` (G's hair masks, its auxiliary teacher), ``classifier`` (trains the attribute nets,
the hair-only one on hair maps) and ``evaluate`` all use them. Kept here, below the scripts, so
that no script imports another for them (``classifier`` and ``stargan`` used to import each
other).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from magdr.checkpoints import WEIGHTS_DIR
from magdr.faces.parsenet import ParseNet
from magdr.faces.regions import BISENET_CLASSES, CLASS_TO_REGION, TARGETS
from training import data as D

#: The shipped weights the runtime loads (``magdr/models/weights/``): the scripts' default
#: inputs (the parser) and outputs (the parser, G).
WEIGHTS = WEIGHTS_DIR
#: Runs, checkpoints and the classifiers, gitignored beside the checkout.
RUNS = Path(__file__).resolve().parents[1] / "runs"


class AttrNet(nn.Module):
    """Small CNN: ``[B,3,H,W]`` in [-1,1] (resized to 64) -> ``[B,5]`` attribute logits."""

    def __init__(self, width: int = 16, n_attr: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for k in range(5):  # 64 -> 2
            cout = width * 2 ** min(k, 3)
            layers += [nn.Conv2d(cin, cout, 3, 2 if k else 1, 1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]  # fmt: skip
            if k == 0:
                layers += [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[-1] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
        return self.head(self.features(x).mean((2, 3)))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> AttrNet:
        """Build with the width inferred from ``sd``."""
        net = cls(width=sd["features.0.weight"].shape[0], n_attr=sd["head.weight"].shape[0])
        net.load_state_dict(sd)
        return net


def hair_only(x: torch.Tensor, hair: torch.Tensor) -> torch.Tensor:
    """The ``hair`` classifier's input: x inside the hair, mid-grey (0) elsewhere.

    ``hair`` is a hair probability map ``[B,1,H,W]``; the hair is where it exceeds 0.5.
    """
    return x * (hair > 0.5).to(x)


def region_probs(parser: ParseNet, images: np.ndarray, batch: int = 64,
                 device: str | torch.device = "cpu") -> np.ndarray:  # fmt: skip
    """Soft hair and face+hair (Male/Young target) masks, ``[B,2,H,W]`` uint8 (0..255)."""
    hair_i = BISENET_CLASSES.index("hair")
    fh = [i for i, c in enumerate(BISENET_CLASSES) if CLASS_TO_REGION[c] in TARGETS["face+hair"]]
    out = np.zeros((len(images), 2, *images.shape[1:3]), np.uint8)
    parser.eval().to(device)
    with torch.no_grad():
        for s in tqdm(range(0, len(images), batch), desc="parsing faces"):
            p = parser(D.to_tensor(images[s : s + batch]).to(device)).softmax(1)
            m = torch.stack([p[:, hair_i], p[:, fh].sum(1)], 1)
            out[s : s + batch] = (m * 255).round().byte().cpu().numpy()
    return out


def cached_region_probs(parser_path: Path, images: np.ndarray,
                        device: str | torch.device = "cpu") -> np.ndarray:  # fmt: skip
    """:func:`region_probs` of CelebA faces, cached per parser file content and image content.

    Keyed by both, not by the number of faces: two sets of the same size (another split,
    shrunk faces) must not share a cache file. Hashing 9000 faces takes about a second.
    """
    parser_digest = hashlib.sha1(parser_path.read_bytes()).hexdigest()[:12]
    faces_digest = hashlib.sha1(np.ascontiguousarray(images)).hexdigest()[:12]
    path = D.cache_dir() / f"regions_{parser_digest}_{faces_digest}_{len(images)}.npy"
    if path.exists():
        return np.load(path)
    sd = torch.load(parser_path, map_location="cpu", weights_only=True)
    out = region_probs(ParseNet.from_state_dict(sd), images, device=device)
    np.save(path, out)
    return out
