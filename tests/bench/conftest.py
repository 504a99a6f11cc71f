"""A tiny trained StarGAN and a tiny parser checkpoint for the quick benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SIZE = 32


def tiny_generator(path: Path, steps: int = 60, seed: int = 0) -> Path:
    """A 32×32 StarGAN (8 channels, 1 block) trained a few seconds as a conditional recolourer.

    It learns G(x, c) ≈ x tinted by the first two attributes, so its output depends on both
    input and condition and attacks can disrupt it, like a real editor.
    """
    from bench.data import synthetic_images
    from magdr.models.stargan import StarGAN

    torch.manual_seed(seed)
    G = StarGAN(conv_dim=8, c_dim=5, repeat_num=1, image_size=SIZE)
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    x = synthetic_images(64, SIZE, seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(64, (16,), generator=g)
        c = (torch.rand(16, 5, generator=g) > 0.5).float()
        tint = torch.stack([c[:, 0] - c[:, 1], c[:, 1] - c[:, 0], torch.zeros(16)], 1) * 0.3
        target = (x[idx] + tint[:, :, None, None]).clamp(-1, 1)
        loss = F.l1_loss(G(x[idx], c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({k: v.detach() for k, v in G.state_dict().items()}, path)
    meta = {
        "kind": "stargan",
        "image_size": SIZE,
        "attributes": ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"],
        "neutral": [0.0, 0.0, 0.0, 0.0, 1.0],
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def tiny_parser(path: Path, seed: int = 0) -> Path:
    """A random-weight ParseNet checkpoint (soft, noisy regions: enough to exercise the guard)."""
    from magdr.faces.parsenet import ParseNet

    torch.manual_seed(seed)
    net = ParseNet(width=4, depth=2)
    torch.save({k: v.detach() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bench_models")
    return tiny_generator(d / "tiny_G.pt"), tiny_parser(d / "tiny_parser.pt")
