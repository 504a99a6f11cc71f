"""The learned purifier: the network, its checkpoints, and the guard's use (its training:
``tests/training/test_purifier_training.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import magdr
from magdr import attacks
from magdr.checkpoints import CheckpointError, weights_digest
from magdr.guard import Guard
from magdr.purifier import (
    SHIPPED,
    STEP_NAME,
    Purifier,
    load_purifier,
    purifier_for,
    purifier_path,
    save_purifier,
)
from magdr.transforms import apply, bpda_apply
from tests.conftest import count_g_images, synthetic_conditions, synthetic_faces


def _faces(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return synthetic_faces(n, torch.Generator().manual_seed(seed), size=size)


class TestNetwork:
    def test_untrained_is_identity(self):
        x = _faces(3, 0)
        torch.testing.assert_close(Purifier(width=4)(x), x)

    def test_output_in_range_and_shape(self):
        P = Purifier(width=4)
        torch.nn.init.normal_(P.head.weight, std=1.0)
        y = P(_faces(2, 1) * 0.99)
        assert y.shape == (2, 3, 32, 32)
        assert y.min() >= -1 and y.max() <= 1


class TestCheckpoints:
    def test_round_trip_keeps_weights_and_meta(self, tmp_path):
        P = Purifier(width=6)
        torch.nn.init.normal_(P.head.weight, std=0.1)
        save_purifier(P, tmp_path / "p.pt", generator_digest="abc", steps=3)
        Q = load_purifier(tmp_path / "p.pt")
        assert Q.width == 6 and Q.meta["generator_digest"] == "abc" and Q.meta["steps"] == 3
        x = _faces(2, 2)
        torch.testing.assert_close(Q(x), P(x))

    def test_not_a_purifier(self, tmp_path):
        torch.save({"main.0.weight": torch.zeros(3)}, tmp_path / "g.pt")
        with pytest.raises(CheckpointError):
            load_purifier(tmp_path / "g.pt")

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="absent.pt"):
            load_purifier(tmp_path / "absent.pt")

    def test_auto_needs_the_generator_it_was_trained_against(self, tiny_stargan):
        # The shipped purifier belongs to the shipped G; any other G gets none.
        assert purifier_for(tiny_stargan, "auto") is None
        assert purifier_for(tiny_stargan, None) is None
        assert purifier_for(tiny_stargan, "none") is None
        P = Purifier(width=4)
        assert purifier_for(tiny_stargan, P) is P

    def test_auto_finds_the_shipped_one_for_the_default_generator(self):
        from magdr.purifier import DEFAULT_PURIFIER

        if not DEFAULT_PURIFIER.exists():
            pytest.skip("no shipped purifier")
        meta = json.loads(DEFAULT_PURIFIER.with_suffix(".json").read_text())
        G = magdr.load_generator("default")
        assert meta["generator_digest"] == weights_digest(G)
        assert isinstance(purifier_for(G, "auto"), Purifier)


class _Oracle(torch.nn.Module):
    """A purifier that knows the answer: maps each attacked face back to its clean face."""

    def __init__(self, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        super().__init__()
        self.x_adv, self.x = x_adv, x

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        d = (q[:, None] - self.x_adv[None]).abs().flatten(2).amax(2)  # [Q, N]
        hit = d.min(1).values < 1e-6
        return torch.where(hit[:, None, None, None], self.x[d.argmin(1)], q)


@pytest.mark.slow
class TestInTheGuard:
    """Guard(purifier=...): tried before Rec-Net's search; kept only where it cures."""

    @pytest.fixture(scope="class")
    def setup(self, tiny_stargan, face_parser):
        from magdr import calibrate
        from magdr.profile import Profile

        G = tiny_stargan
        g = torch.Generator().manual_seed(5)
        x, c = synthetic_faces(40, g), synthetic_conditions(40, g)
        x_adv = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(6))
        base = Guard(G, parser=face_parser, profile=Profile(), device="cpu", purifier=None)
        x_neg = torch.cat([x[:32], calibrate.benign_copies(x[:32])])
        profile = calibrate.fit(
            base, x_neg, c[:32].repeat(4, 1), x_adv[:16], c[:16], fpr=0.01
        )  # fmt: skip
        return {"G": G, "parser": face_parser, "profile": profile,
                "x": x[32:], "c": c[32:], "x_adv": x_adv[32:]}  # fmt: skip

    def _guard(self, s, purifier, **kw):
        return Guard(s["G"], parser=s["parser"], profile=s["profile"], device="cpu",
                     purifier=purifier, **kw)  # fmt: skip

    def test_a_curing_purifier_replaces_the_search(self, setup):
        s = setup
        plain, n_plain = count_g_images(s["G"], lambda: self._guard(s, None)(s["x_adv"], s["c"]))
        guard = self._guard(s, _Oracle(s["x_adv"], s["x"]))
        r, n_pur = count_g_images(s["G"], lambda: guard(s["x_adv"], s["c"]))
        assert r.disrupted.all() and plain.disrupted.all()
        assert all(ch == [{"name": STEP_NAME, "params": {}, "region": "all", "layer": 0}]
                   for ch in r.chains)  # fmt: skip
        torch.testing.assert_close(r.purified, s["x"])
        with torch.no_grad():
            torch.testing.assert_close(r.output, s["G"](s["x"], s["c"]))
        assert (r.score_after < r.threshold).all()
        assert n_pur < n_plain / 5, (n_pur, n_plain)

    def test_a_useless_purifier_falls_back_to_rec_net(self, setup):
        s = setup
        plain = self._guard(s, None)(s["x_adv"], s["c"])
        r = self._guard(s, Purifier(width=4))(s["x_adv"], s["c"])  # the identity
        assert r.chains == plain.chains
        torch.testing.assert_close(r.purified, plain.purified)

    def test_clean_faces_never_meet_it(self, setup):
        s = setup
        r = self._guard(s, _Oracle(s["x_adv"], s["x"]))(s["x"], s["c"])
        assert not r.disrupted.any() and not any(r.chains)
        assert torch.equal(r.purified, s["x"])

    def test_purify_all_gives_every_face_g_of_p(self, setup):
        """``purify_all``: faces that pass are published as G(P(x̂)) too; flags unchanged."""
        s = setup
        P = Purifier(width=4)
        torch.nn.init.normal_(P.head.weight, std=0.01)  # a P that moves faces a little
        x = torch.cat([s["x"][:3], s["x_adv"][:3]])
        c = torch.cat([s["c"][:3], s["c"][:3]])
        flagged = self._guard(s, P)(x, c)
        every = self._guard(s, P, purify_all=True)(x, c)
        assert torch.equal(every.disrupted, flagged.disrupted)
        passed = ~every.disrupted
        assert passed.any()
        with torch.no_grad():
            torch.testing.assert_close(every.purified[passed], P(x[passed]))
            torch.testing.assert_close(every.output[passed], s["G"](P(x[passed]), c[passed]))
        step = {"name": STEP_NAME, "params": {}, "region": "all", "layer": 0}
        assert all(every.chains[i] == [step] for i in passed.nonzero().flatten().tolist())
        torch.testing.assert_close(every.output[~passed], flagged.output[~passed])
        with pytest.raises(ValueError, match="purify_all"):
            self._guard(s, None, purify_all=True)

    def test_a_purifier_chain_is_reused_as_a_hint(self, setup):
        s = setup
        guard = self._guard(s, _Oracle(s["x_adv"], s["x"]))
        first = guard(s["x_adv"], s["c"])
        again = guard(s["x_adv"], s["c"], hints=first.chains)
        assert again.reused.all()
        # Without a purifier the same hint cannot be applied: the search runs instead.
        other = self._guard(s, None)(s["x_adv"], s["c"], hints=first.chains)
        assert not other.reused.any()


def test_shipped_names_and_paths(tmp_path):
    assert purifier_path("default") == SHIPPED["default"]
    assert purifier_path("detector") == SHIPPED["detector"]
    assert purifier_path(tmp_path / "p.pt") == tmp_path / "p.pt"
    assert purifier_path("runs/p.pt") == Path("runs/p.pt")


class TestAsConsistencyTransform:
    """``{"name": "purifier"}`` among the detector's transforms (Eq. 7), and the guard's reuse."""

    @pytest.fixture()
    def trained(self, tmp_path):
        """A purifier checkpoint that changes faces (its last layer is not zero)."""
        torch.manual_seed(0)
        P = Purifier(width=4)
        torch.nn.init.normal_(P.head.weight, std=0.05)
        save_purifier(P, tmp_path / "p.pt")
        return tmp_path / "p.pt"

    def test_untrained_is_the_identity_with_a_true_gradient(self, tmp_path):
        save_purifier(Purifier(width=4), tmp_path / "id.pt")
        with torch.inference_mode():  # first use under inference mode, as the guard's detect
            apply("purifier", _faces(1, 3), path=str(tmp_path / "id.pt"))
        x = _faces(2, 3).requires_grad_()
        y = bpda_apply("purifier", x, path=str(tmp_path / "id.pt"))
        torch.testing.assert_close(y, x)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        torch.testing.assert_close(x.grad, torch.arange(y.numel()).view_as(y).float())

    def test_guard_reuses_the_detectors_purified_faces(self, tiny_stargan, face_parser, trained):
        from magdr.profile import Profile

        spec = {"name": "purifier", "params": {"path": str(trained)}}
        # A threshold below every score: each face is flagged and goes to the purifier.
        profile = Profile(consistency=[spec], reference=spec, threshold=-1.0)
        profile.recnet.max_rounds = 0
        g = torch.Generator().manual_seed(4)
        x, c = synthetic_faces(6, g), synthetic_conditions(6, g)

        def run(purifier):
            guard = Guard(tiny_stargan, parser=face_parser, profile=profile, device="cpu",
                          purifier=purifier)  # fmt: skip
            return guard, count_g_images(tiny_stargan, lambda: guard(x, c))

        shared, (r, n_shared) = run(str(trained))
        apart = load_purifier(trained)
        del apart.source  # the same weights, not known to be the detector's: computed again
        alone, (r2, n_apart) = run(apart)
        assert shared._purifier_k == 0 and alone._purifier_k is None
        assert r.disrupted.all()
        assert all(ch[0]["name"] == STEP_NAME for ch in r.chains)
        for name in ("purified", "output", "score_after", "score"):
            torch.testing.assert_close(getattr(r, name), getattr(r2, name))
        assert n_shared == n_apart - len(x), (n_shared, n_apart)

    def test_the_search_runs_after_a_purifier_that_leaves_the_face_flagged(
        self, tiny_stargan, face_parser, trained
    ):
        """With a (distilled) purifier as the detector's transform and the guard's own P apart
        from it, P's output is where Rec-Net's search starts wherever it lowers S_final, and the
        search still runs while the face stays flagged: a beaten P is never trusted alone."""
        from magdr.profile import Profile

        spec = {"name": "purifier", "params": {"path": str(trained)}}
        profile = Profile(consistency=[spec], reference=spec, threshold=-1.0, lam=0.0)
        g = torch.Generator().manual_seed(4)
        x, c = synthetic_faces(6, g), synthetic_conditions(6, g)
        # The guard's P maps each face to a copy whose S_final is lower but still above the
        # threshold (PGD saturates this tiny G, and the detector's P then moves it less).
        lower = attacks.pgd(tiny_stargan, x, c, generator=torch.Generator().manual_seed(5))
        guard = Guard(tiny_stargan, parser=face_parser, profile=profile, device="cpu",
                      purifier=_Oracle(x, lower))  # fmt: skip
        assert guard._purifier_k is None
        assert (guard.detect(lower, c).score < guard.detect(x, c).score).all()
        r = guard(x, c)
        assert r.disrupted.all()
        step = {"name": STEP_NAME, "params": {}, "region": "all", "layer": 0}
        for chain in r.chains:  # P first, then Rec-Net's layers on its output
            assert chain[0] == step and len(chain) > 1
            assert all(st["name"] != STEP_NAME for st in chain[1:])
        torch.testing.assert_close(guard.replay(x, r.chains), r.purified, atol=1e-5, rtol=0)

    @pytest.mark.slow
    def test_shipped_purifier_separates_pgd_from_clean_faces(self):
        """On held-out CelebA faces the shipped G's output moves under the shipped P many times
        more for PGD-disrupted faces than for clean ones (what the shipped profile relies on)."""
        from tests.conftest import data_dir

        if not (data_dir() / "celeba").is_dir():
            pytest.skip("no CelebA data")
        from magdr.celeba import load_celeba, to_tensor

        G = magdr.load_generator("default")
        celeba = load_celeba(data_dir())
        x = to_tensor(celeba["images"][8000:8012])
        c = magdr.condition(G, {"Blond_Hair": 1}, batch=len(x))
        x_adv = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y, y_adv = G(x, c), G(x_adv, c)
            hit = (y_adv - y).square().mean((1, 2, 3)) > 0.05

            def moved(z):
                return (G(apply("purifier", z), c) - G(z, c)).square().mean((1, 2, 3))

            clean, attacked = moved(x), moved(x_adv)[hit]
        assert hit.sum() >= 3
        assert attacked.min() > 5 * clean.max(), (attacked, clean)


def test_the_shipped_purifier_holds_against_pgd_through_it():
    """The shipped P was fine-tuned on PGD through G∘P (``--robust``): on held-out faces PGD
    through G∘P at ε 0.05 leaves every output within the disruption bar of G(x, c) (the purifier
    before it let all 16 of 16 through at ε 0.03), and clean faces' edits stay put."""
    from tests.conftest import data_dir

    if not (data_dir() / "celeba").is_dir():
        pytest.skip("no CelebA data")
    from magdr.celeba import load_celeba, to_tensor

    G = magdr.load_generator("default")
    x = to_tensor(load_celeba(data_dir())["images"][8100:8106])
    c = magdr.condition(G, {"Blond_Hair": 1}, batch=len(x))
    P = load_purifier("default")
    assert P.meta["robust"] and P.meta["generator_digest"] == weights_digest(G)

    from training.purifier import Purified

    with torch.no_grad():
        y = G(x, c)
    x_adv = attacks.PGD(Purified(G, P), eps=0.05, step=0.0125, steps=20)(
        x, c, reference=y, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert ((G(P(x_adv), c) - y).square().mean((1, 2, 3)) < attacks.SUCCESS_MSE).all()
        assert (G(P(x), c) - y).square().mean() < 1e-4
