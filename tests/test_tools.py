"""tools/heldout_check.py's frame model: what the model card's frame-carried numbers rest on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "heldout_check.py"


def _heldout_check():
    spec = importlib.util.spec_from_file_location("heldout_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resampled_carries_a_smoothed_perturbation():
    from bench.data import synthetic_images

    resampled = _heldout_check().resampled
    g = torch.Generator().manual_seed(0)
    x = synthetic_images(2, 32, 0)  # smooth, like faces: the round trip keeps them
    noise = (torch.rand(x.shape, generator=g) * 2 - 1).sign() * 0.05  # PGD-like ±ε
    clean, carried = resampled(x, x + noise, side=50)
    assert clean.shape == carried.shape == x.shape
    # No perturbation: the frame round trip gives the same face twice, close to x (8-bit steps,
    # two resizes).
    same_clean, same_carried = resampled(x, x, side=50)
    assert torch.equal(same_clean, same_carried)
    assert (same_clean - x).abs().mean() < 0.04
    # The perturbation arrives, but smoothed: weaker than ±ε and correlated with it.
    delta = carried - clean
    assert 0.01 < delta.abs().mean() < 0.04  # ±0.05 sent
    assert torch.corrcoef(torch.stack([delta.flatten(), noise.flatten()]))[0, 1] > 0.5
