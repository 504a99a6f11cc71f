"""Rec-Net (paper §3.2.3, Algorithm 1): pretraining picks Q_i, inference builds chains R.

The score functions here are synthetic with a known minimum: the distance of a candidate to a
hidden image (a clean face, or a known transform of the input), standing in for S_final.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magdr.profile import Profile
from magdr.reconstruct import infer, pretrain
from magdr.transforms import REGISTRY, apply, bitdepth, gaussian_blur


def _smooth(b: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 4, 4, generator=g) * 1.4 - 0.7
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def _mse_to(hidden: torch.Tensor, calls: list | None = None):
    """S_final stand-in: MSE of each candidate to its item's hidden image."""

    def score(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(x.shape[0])
        return (x - hidden[idx]).square().mean((1, 2, 3))

    return score


class TestPretrain:
    # The hidden image of each category is its input under one grid point: that point scores 0.
    HIDDEN = {
        "bitdepth": {"bits": 4},
        "median": {"k": 5},
        "gaussian_blur": {"sigma": 1.1},
        "jpeg": {"quality": 60},
    }

    def test_picks_each_categorys_minimum(self):
        x = _smooth(5) + 0.05 * torch.randn(
            5, 3, 16, 16, generator=torch.Generator().manual_seed(1)
        )
        x = x.clamp(-1, 1)
        hidden = {cat: apply(cat, x, **p) for cat, p in self.HIDDEN.items()}
        idx_all = torch.arange(5)

        def score(xc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            # The nearest hidden image: each category can only reach its own exactly.
            d = [(xc - h[idx]).square().mean((1, 2, 3)) for h in hidden.values()]
            return torch.stack(d).amin(0)

        calls: list[int] = []

        def counted(xc, idx):
            calls.append(len(idx))
            assert torch.equal(idx, idx_all[: len(idx)] + (idx[0] if len(idx) else 0))
            return score(xc, idx)

        q = pretrain(counted, x, [list(self.HIDDEN)], chunk=2)
        assert len(q) == 1 and [m["name"] for m in q[0]] == list(self.HIDDEN)
        for m in q[0]:
            assert m["params"] == self.HIDDEN[m["name"]], m
            assert m["score"] == pytest.approx(0.0, abs=1e-12)
        # Every grid point of every category scored on all 5 images, in chunks of <= 2.
        assert max(calls) <= 2
        assert sum(calls) == 5 * sum(len(REGISTRY[c].grid) for c in self.HIDDEN)

    def test_later_layers_see_earlier_output(self):
        # Hidden = blur then 4-bit: layer 1 learns the blur, layer 2 then finds 4 bits exact.
        x = _smooth(3) + 0.1 * torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        x = x.clamp(-1, 1)
        hidden = bitdepth(gaussian_blur(x, 1.5), 4)
        q = pretrain(_mse_to(hidden), x, [["gaussian_blur"], ["bitdepth"]])
        assert q[0][0]["params"] == {"sigma": 1.5}
        assert q[1][0] == {"name": "bitdepth", "params": {"bits": 4}, "score": 0.0}

    def test_scores_are_means(self):
        x = _smooth(4)
        hidden = x.clone()
        q = pretrain(_mse_to(hidden), x, [["resize"]])
        p = q[0][0]["params"]
        expected = (apply("resize", x, **p) - x).square().mean().item()
        assert q[0][0]["score"] == pytest.approx(expected, rel=1e-5)
        assert p == {"scale": 0.85}  # the mildest resize is closest to the input itself


class TestInfer:
    @pytest.fixture()
    def setup(self):
        g = torch.Generator().manual_seed(3)
        clean = _smooth(3, seed=4)
        noise = 0.15 * torch.randn(clean.shape, generator=g)
        x = (clean + noise).clamp(-1, 1)
        # Patches: left and middle thirds; the right third belongs to no patch.
        patches = torch.zeros(3, 2, 16, 16)
        patches[:, 0, :, :5] = 1
        patches[:, 1, :, 5:11] = 1
        return clean, x, patches

    def test_lowers_score_inside_patches_only(self, setup):
        clean, x, patches = setup
        score = _mse_to(clean)
        items = torch.arange(3)
        before = score(x, items)
        q = Profile().recnet.q_layers()
        x_star, chains, after = infer(x, score, patches, q, ["left", "middle"])
        assert x_star.shape == x.shape
        assert (after < before).all()
        torch.testing.assert_close(after, score(x_star, items))
        # Outside every patch the input is untouched, bit for bit.
        assert torch.equal(x_star[..., 11:], x[..., 11:])
        for i, chain in enumerate(chains):
            assert chain, f"item {i} got no transform"
            for step in chain:
                assert set(step) == {"name", "params", "region", "layer"}
                assert step["region"] in ("left", "middle")
                assert step["layer"] in (0, 1)
                assert step["params"] in REGISTRY[step["name"]].grid
                assert step["name"] in {m["name"] for m in q[step["layer"]]}
            # Layers are visited in order within each patch.
            for region in ("left", "middle"):
                layers = [s["layer"] for s in chain if s["region"] == region]
                assert layers == sorted(layers)

    def test_chain_replays_to_result(self, setup):
        clean, x, patches = setup
        x_star, chains, _ = infer(
            x, _mse_to(clean), patches, Profile().recnet.q_layers(), ["left", "middle"]
        )
        for i, chain in enumerate(chains):
            cur = x[i : i + 1]
            for step in chain:
                m = patches[i : i + 1, ["left", "middle"].index(step["region"])][:, None]
                cur = m * apply(step["name"], cur, **step["params"]) + (1 - m) * cur
            torch.testing.assert_close(cur, x_star[i : i + 1])

    def test_never_raises_score(self, setup):
        # The input is already the optimum: nothing can help, so nothing is applied.
        _, x, patches = setup
        score = _mse_to(x)
        x_star, chains, after = infer(x, score, patches, Profile().recnet.q_layers(), ["l", "m"])
        assert torch.equal(x_star, x)
        assert chains == [[], [], []]
        assert (after == 0).all()

    def test_searches_full_grid_of_top_category(self):
        # Q_i only offers sigma 0.5; the hidden image is the input blurred at 1.5 (line 9-10).
        x = _smooth(2) + 0.2 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        x = x.clamp(-1, 1)
        hidden = gaussian_blur(x, 1.5)
        q = [
            [
                {"name": "gaussian_blur", "params": {"sigma": 0.5}},
                {"name": "bitdepth", "params": {"bits": 6}},
            ]
        ]
        x_star, chains, after = infer(
            x, _mse_to(hidden), torch.ones(2, 1, 16, 16), q, ["all"], top_categories=1
        )
        assert (
            chains
            == [[{"name": "gaussian_blur", "params": {"sigma": 1.5}, "region": "all", "layer": 0}]]
            * 2
        )
        torch.testing.assert_close(after, torch.zeros(2), atol=1e-10, rtol=0)

    def test_only_top_categories_compete(self):
        # Line 8-10: an item may only take a method of its own top categories, even when the
        # full grid of another item's top category (scored in the same batch) would beat it.
        g = torch.Generator().manual_seed(6)
        x = (_smooth(2, seed=7) + 0.2 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)
        blur_h, bits_h = gaussian_blur(x, 0.5), bitdepth(x, 4)

        def score(xc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            to_blur = (xc - blur_h[idx]).square().mean((1, 2, 3)) + 5e-4
            to_bits = (xc - bits_h[idx]).square().mean((1, 2, 3))
            # Item 0 is best served by the blur of Q_i, item 1 by 4 bits.
            return torch.where(idx == 0, torch.minimum(to_blur, to_bits), to_bits)

        q = [[{"name": "gaussian_blur", "params": {"sigma": 0.5}},
              {"name": "bitdepth", "params": {"bits": 6}}]]  # fmt: skip
        # Preconditions: on Q_i, item 0 ranks the blur first and item 1 the bit depth.
        both = torch.cat([gaussian_blur(x, 0.5), bitdepth(x, 6)])
        s_q = score(both, torch.tensor([0, 1, 0, 1])).view(2, 2)
        assert s_q[0, 0] < s_q[1, 0] and s_q[0, 1] > s_q[1, 1]
        _, chains, after = infer(x, score, torch.ones(2, 1, 16, 16), q, ["all"], top_categories=1)
        assert chains[0] == [{"name": "gaussian_blur", "params": {"sigma": 0.5}, "region": "all",
                              "layer": 0}]  # fmt: skip
        assert chains[1] == [{"name": "bitdepth", "params": {"bits": 4}, "region": "all",
                              "layer": 0}]  # fmt: skip
        assert after[0].item() == pytest.approx(5e-4) and after[1].item() == 0

    def test_each_item_scores_only_its_own_grids(self):
        # Line 9 per item: a batch must not score item 0 on item 1's category grid (in a batch
        # the union of the top categories is most of the grid, which would double the work).
        g = torch.Generator().manual_seed(6)
        x = (_smooth(2, seed=7) + 0.2 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)
        hidden = torch.stack([gaussian_blur(x, 1.5)[0], bitdepth(x, 4)[1]])
        q = [[{"name": "gaussian_blur", "params": {"sigma": 0.5}},
              {"name": "bitdepth", "params": {"bits": 6}}]]  # fmt: skip
        seen: list[tuple[int, ...]] = []

        def score(xc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(idx.tolist()))
            return (xc - hidden[idx]).square().mean((1, 2, 3))

        _, chains, _ = infer(x, score, torch.ones(2, 1, 16, 16), q, ["all"], top_categories=1)
        owners = [i for call in seen for i in call]
        n_blur, n_bits = len(REGISTRY["gaussian_blur"].grid), len(REGISTRY["bitdepth"].grid)
        # x itself, Q_i, then the rest of each item's own grid only.
        assert owners.count(0) == 1 + 2 + (n_blur - 1)
        assert owners.count(1) == 1 + 2 + (n_bits - 1)
        assert chains[0][0]["params"] == {"sigma": 1.5} and chains[1][0]["params"] == {"bits": 4}

    def test_start_score_and_small_patches(self, setup):
        clean, x, patches = setup
        patches = patches.clone()
        patches[1] = 0  # item 1: no patch covers anything
        calls: list[int] = []
        score = _mse_to(clean, calls)
        start = score(x, torch.arange(3))
        calls.clear()
        x_star, chains, after = infer(
            x, score, patches, Profile().recnet.q_layers(), ["left", "middle"], start_score=start
        )
        assert calls[0] == 3 * 4  # no call to score x itself: the first scores Q_1's 4 methods
        assert chains[1] == [] and torch.equal(x_star[1], x[1])
        assert after[1] == start[1]
        assert chains[0] and chains[2]
