"""``python -m bench.purifier_variants``: EoT through a random purifier, counts, section."""

from __future__ import annotations

import torch
from torch import nn

from bench import purifier_variants as V
from magdr.attacks import _mse


class _Tint(nn.Module):
    def forward(self, x, c):
        return torch.tanh(4 * x + c[:, :1, None, None])


def test_every_variant_keeps_shape_and_range_and_the_random_ones_vary():
    P = nn.Identity()
    Q = lambda x: 0.5 * x  # noqa: E731
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    for name, (_, random, make) in V.VARIANTS.items():
        T = make(P, Q, torch.Generator().manual_seed(1))
        draws = [T(x) for _ in range(6)]
        assert draws[0].shape == x.shape, name
        assert any(not torch.equal(draws[0], d) for d in draws[1:]) == random, name


def test_eot_objective_is_the_mean_over_draws():
    G = _Tint()
    flips = iter([1.0, -1.0, 1.0])
    T = lambda x: next(flips) * x  # noqa: E731
    x, c = torch.full((1, 3, 4, 4), 0.3), torch.zeros(1, 5)
    r = torch.zeros(1, 3, 4, 4)
    attack = V.EoTPGD(G, T, eot=2, eps=0.1, steps=1)
    want = (_mse(G(x, c), r) + _mse(G(-x, c), r)) / 2
    torch.testing.assert_close(attack._objective(c, r)(x), want)


def test_run_variant_counts_and_section_row():
    G = _Tint()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 0.2 - 0.1
    c = torch.zeros(3, 5)
    identity = V.run_variant(G, lambda v: v, False, x, c, [0.2], steps=5, step=0.05, eot=1,
                             draws=3)  # fmt: skip
    assert identity["clean_psnr_db"] == 100.0  # G(T(x)) is G(x): the PSNR cap
    row = identity["eps"]["0.2"]
    assert row["faces"] == 3 and row["through"] == 3 == row["disrupting_plain_g"]
    flat = V.run_variant(G, lambda v: 0 * v + x, False, x, c, [0.2], steps=5, step=0.05, eot=1,
                         draws=3)  # fmt: skip
    assert flat["eps"]["0.2"]["through"] == 0  # T(x̂) is x whatever x̂: nothing to attack
    res = {"command": "python -m bench.purifier_variants", "commit": "abc", "machine": "cpu",
           "attack": "PGD.", "variants": {"P": identity, "P∘P": flat}}  # fmt: skip
    text = V.section(res)
    assert text.startswith("## Purifier variants at inference\n")
    assert "| P | the shipped purifier (the guard's road) | no | 100.0 / 100.0 dB | 3/3 " in text
    assert "| P∘P | the purifier twice | no |" in text and "0/3 (median MSE" in text
