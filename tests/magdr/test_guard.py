"""The Guard (DESIGN §3): result fields, pass-through of clean items, input checks, OOM splitting,
a differentiable score, and the end-to-end test of the issue: PGD disrupts a small trained
generator, the calibrated Guard flags the attacked faces and not the clean ones, and
reconstruction brings the output back towards the clean output."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from magdr import attacks, calibrate
from magdr.check import ShapeError
from magdr.faces.regions import REGIONS
from magdr.guard import Guard, GuardResult
from magdr.models.stargan import StarGAN
from magdr.profile import Profile
from tests.conftest import count_g_images, synthetic_conditions, synthetic_faces

SIZE = 16


@pytest.fixture(scope="module")
def small_g() -> StarGAN:
    torch.manual_seed(0)
    return StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=SIZE).eval()


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return synthetic_faces(4, g, size=SIZE), torch.eye(5)[[0, 1, 2, 0]]


def _guard(G, parser, **profile_kw) -> Guard:
    return Guard(G, parser=parser, profile=Profile(**profile_kw), device="cpu")


def _between(scores: torch.Tensor) -> float:
    """A threshold halfway between the two middle scores: half the batch above, half below."""
    s = scores.sort().values
    return float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().mean((1, 2, 3))


class OOMGenerator(nn.Module):
    """Runs G, but raises CUDA-style out-of-memory on more than ``limit`` images per call."""

    def __init__(self, G: StarGAN, limit: int) -> None:
        super().__init__()
        self.G, self.limit, self.calls = G, limit, []
        self.image_size, self.c_dim = G.image_size, G.c_dim

    def forward(self, x, c):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"tried to allocate {x.shape[0]} faces")
        return self.G(x, c)

    def target_regions(self, c, batch=None):
        return self.G.target_regions(c, batch)


class TestResult:
    def test_fields(self, small_g, face_parser, batch):
        x, c = batch
        # A threshold between the scores: some items disrupted, some not.
        scores = _guard(small_g, face_parser).detect(x, c).score
        guard = _guard(small_g, face_parser, threshold=_between(scores))
        r = guard(x, c)
        assert isinstance(r, GuardResult) and len(r) == 4
        assert r.disrupted.dtype == torch.bool and r.disrupted.shape == (4,)
        assert 0 < int(r.disrupted.sum()) < 4
        for f in (r.score, r.s_dist, r.s_cons, r.score_after):
            assert f.shape == (4,) and f.dtype == torch.float32
        assert r.output.shape == r.purified.shape == (4, 3, SIZE, SIZE)
        assert r.flags.shape == (4, len(REGIONS)) and r.flags.dtype == torch.bool
        assert isinstance(r.chains, list) and len(r.chains) == 4
        assert all(isinstance(ch, list) for ch in r.chains)
        assert r.threshold == guard.profile.threshold
        torch.testing.assert_close(r.score, scores)
        assert torch.equal(r.disrupted, r.score > r.threshold)
        torch.testing.assert_close(r.score, guard.profile.lam * r.s_dist + r.s_cons)

    def test_clean_items_pass_through(self, small_g, face_parser, batch):
        x, c = batch
        scores = _guard(small_g, face_parser).detect(x, c).score
        guard = _guard(small_g, face_parser, threshold=_between(scores))
        x_before = x.clone()
        r = guard(x, c)
        assert torch.equal(x, x_before)  # the input is not modified in place
        keep = ~r.disrupted
        with torch.no_grad():
            y = small_g(x, c)
        torch.testing.assert_close(r.output[keep], y[keep])
        assert torch.equal(r.purified[keep], x[keep])
        assert all(r.chains[i] == [] for i in keep.nonzero().flatten().tolist())
        assert torch.equal(r.score_after[keep], r.score[keep])

    def test_disrupted_items_output_is_g_of_purified(self, small_g, face_parser, batch):
        x, c = batch
        r = _guard(small_g, face_parser, threshold=-math.inf)(x, c)
        assert r.disrupted.all()
        with torch.no_grad():
            torch.testing.assert_close(r.output, small_g(r.purified, c))
        assert any(r.chains)  # Rec-Net did something for at least one face
        for i, chain in enumerate(r.chains):
            if not chain:
                assert torch.equal(r.purified[i], x[i])
            for step in chain:
                assert set(step) == {"name", "params", "region", "layer"}

    def test_nothing_disrupted(self, small_g, face_parser, batch):
        x, c = batch
        r = _guard(small_g, face_parser, threshold=math.inf)(x, c)
        assert not r.disrupted.any() and r.chains == [[]] * 4
        assert torch.equal(r.purified, x)
        with torch.no_grad():
            torch.testing.assert_close(r.output, small_g(x, c))

    def test_deterministic_and_max_batch(self, small_g, face_parser, batch):
        x, c = batch
        scores = _guard(small_g, face_parser).detect(x, c).score
        kw = {"threshold": _between(scores)}
        r1 = _guard(small_g, face_parser, **kw)(x, c)
        r2 = Guard(small_g, face_parser, Profile(**kw), device="cpu", max_batch=3, recnet_chunk=5)(
            x, c
        )
        assert r1.disrupted.any()  # Rec-Net ran, with other chunks
        for name in ("disrupted", "score", "output", "purified", "score_after"):
            torch.testing.assert_close(getattr(r1, name), getattr(r2, name))
        assert r1.chains == r2.chains

    def test_cat(self, small_g, face_parser, batch):
        x, c = batch
        guard = _guard(small_g, face_parser, threshold=math.inf)
        whole = guard(x, c)
        parts = GuardResult.cat([guard(x[:1], c[:1]), guard(x[1:], c[1:])])
        assert len(parts) == 4 and parts.chains == whole.chains
        torch.testing.assert_close(parts.output, whole.output)
        torch.testing.assert_close(parts.score, whole.score)


class CountingParser(nn.Module):
    """Wraps a parser and records how many faces each call parsed."""

    def __init__(self, parser: nn.Module) -> None:
        super().__init__()
        self.parser, self.faces = parser, []

    def forward(self, x):
        self.faces.append(x.shape[0])
        return self.parser(x)


class TestLambdaZero:
    """With λ = 0 (the shipped profile) S_final is S_cons alone: a face is parsed only when
    Rec-Net's search or a hint needs its region patches."""

    REF = {"name": "median", "params": {"k": 3}}

    def test_parses_only_the_faces_it_searches(self, small_g, face_parser, batch):
        x, c = batch
        kw = {"lam": 0.0, "reference": self.REF}
        full = _guard(small_g, face_parser, **kw).detect(x, c)  # detect parses every face
        parser = CountingParser(face_parser)
        guard = _guard(small_g, parser, threshold=_between(full.score), **kw)
        r = guard(x, c)
        flagged = r.disrupted
        assert int(flagged.sum()) == 2 and parser.faces == [2]
        torch.testing.assert_close(r.score, full.score)
        torch.testing.assert_close(r.s_dist[flagged], full.s_dist[flagged])
        assert torch.equal(r.flags[flagged], full.flags[flagged])
        assert r.s_dist[~flagged].isnan().all() and not r.flags[~flagged].any()
        with torch.no_grad():
            torch.testing.assert_close(r.output, small_g(r.purified, c))

    def test_clean_batch_is_never_parsed(self, small_g, face_parser, batch):
        x, c = batch
        parser = CountingParser(face_parser)
        r = _guard(small_g, parser, lam=0.0, threshold=math.inf)(x, c)
        assert parser.faces == [] and not r.disrupted.any()

    def test_a_purifier_only_hint_needs_no_parse(self, small_g, face_parser, batch):
        x, c = batch
        kw = {"lam": 0.0}
        full = _guard(small_g, face_parser, **kw).detect(x, c)
        parser = CountingParser(face_parser)
        guard = Guard(small_g, parser=parser, profile=Profile(threshold=_between(full.score),
                      **kw), device="cpu", purifier=nn.Identity())  # fmt: skip
        hint = [{"name": "purifier", "params": {}, "region": "all", "layer": 0}]
        guard.profile.recnet.max_rounds = 0
        r = guard(x, c, hints=[hint] * len(x))
        assert int(r.disrupted.sum()) == 2 and parser.faces == []


class TestInputChecks:
    def test_wrong_size(self, small_g, face_parser):
        with pytest.raises(ValueError, match=r"expected faces of 16x16.*got \[32, 32\]"):
            _guard(small_g, face_parser)(torch.zeros(1, 3, 32, 32), torch.zeros(1, 5))

    @pytest.mark.parametrize("c", [None, torch.zeros(1, 5), torch.zeros(2, 4), torch.zeros(5)])
    def test_wrong_condition(self, small_g, face_parser, c):
        guard = _guard(small_g, face_parser)
        with pytest.raises(ValueError, match=r"c: expected shape \[2,5\]"):
            guard(torch.zeros(2, 3, SIZE, SIZE), c)
        with pytest.raises(ValueError, match=r"c: expected shape"):
            guard.score(torch.zeros(2, 3, SIZE, SIZE), c)

    def test_not_images(self, small_g, face_parser):
        guard = _guard(small_g, face_parser)
        with pytest.raises(ShapeError):
            guard(torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 5))
        with pytest.raises(TypeError):
            guard(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(1, 5))

    def test_unconditional_generator_ignores_c(self, face_parser):
        G = StarGAN(conv_dim=4, c_dim=0, repeat_num=1, image_size=SIZE)
        r = _guard(G, face_parser, threshold=math.inf)(torch.zeros(2, 3, SIZE, SIZE), None)
        assert len(r) == 2


class TestOutOfMemory:
    def test_splits_and_never_drops(self, small_g, face_parser, batch, caplog):
        x, c = batch
        # On the CPU the detector calls G once on the faces and once on each transform of them
        # (on a GPU once on all stacked): more than 2 faces in a call run out of memory.
        G = OOMGenerator(small_g, limit=2)
        guard = Guard(G, parser=face_parser, profile=Profile(threshold=math.inf), device="cpu")
        with caplog.at_level(logging.WARNING, logger="magdr.guard"):
            r = guard(x, c)
        assert len(r) == 4 and r.chains == [[]] * 4
        assert "splitting" in caplog.text
        assert G.calls[0] == 4  # tried the whole batch first
        ref = Guard(small_g, face_parser, Profile(threshold=math.inf), device="cpu")(x, c)
        torch.testing.assert_close(r.output, ref.output)
        torch.testing.assert_close(r.score, ref.score)

    def test_single_face_reraises(self, small_g, face_parser, batch):
        x, c = batch
        guard = Guard(OOMGenerator(small_g, limit=0), face_parser, Profile(), device="cpu")
        with pytest.raises(torch.OutOfMemoryError):
            guard(x[:1], c[:1])
        with pytest.raises(torch.OutOfMemoryError):  # a batch splits down to 1, then gives up
            guard(x, c)


class TestScore:
    def test_differentiable(self, small_g, face_parser, batch):
        x, c = batch
        guard = _guard(small_g, face_parser)
        xg = x.clone().requires_grad_(True)
        s = guard.score(xg, c)
        assert s.shape == (4,) and s.requires_grad
        (grad,) = torch.autograd.grad(s.sum(), xg)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # Each item's score depends on its own face only.
        (g0,) = torch.autograd.grad(guard.score(xg, c)[0], xg)
        assert g0[0].abs().sum() > 0 and g0[1:].abs().sum() == 0
        torch.testing.assert_close(s.detach(), guard.detect(x, c).score)


@pytest.mark.gpu
def test_cuda_matches_cpu(small_g, face_parser, batch):
    x, c = batch
    scores = _guard(small_g, face_parser).detect(x, c).score
    kw = {"threshold": _between(scores)}
    cpu = Guard(small_g, face_parser, Profile(**kw), device="cpu")(x, c)
    G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=SIZE)  # small_g stays on the CPU
    G.load_state_dict(small_g.state_dict())
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    try:
        r = Guard(G, face_parser, Profile(**kw), device="cuda")(x.cuda(), c.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert r.output.device.type == "cuda" and r.score.device.type == "cuda"
    assert torch.equal(r.disrupted.cpu(), cpu.disrupted)
    torch.testing.assert_close(r.score.cpu(), cpu.score, atol=1e-4, rtol=1e-3)
    keep = ~cpu.disrupted
    torch.testing.assert_close(r.output.cpu()[keep], cpu.output[keep], atol=1e-4, rtol=1e-3)
    with torch.no_grad():  # Rec-Net may break near-ties differently: check G(purified) instead
        torch.testing.assert_close(r.output, G(r.purified, c.cuda()), atol=1e-4, rtol=1e-3)


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_stargan, face_parser):
    G = tiny_stargan
    g = torch.Generator().manual_seed(1)
    x, c = synthetic_faces(104, g), synthetic_conditions(104, g)
    # Train: 96 clean faces (+ 3 benign copies each) and 24 attacked; held out: the last 8.
    train, test = slice(0, 96), slice(96, 104)
    adv_idx = torch.cat([torch.arange(24), torch.arange(96, 104)])
    x_adv = attacks.pgd(
        G, x[adv_idx], c[adv_idx], eps=0.05, step=0.01, steps=10,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    with torch.no_grad():
        y, y_adv = G(x[adv_idx], c[adv_idx]), G(x_adv, c[adv_idx])
    base = Guard(G, parser=face_parser, profile=Profile(), device="cpu")
    x_neg = torch.cat([x[train], calibrate.benign_copies(x[train])])
    c_neg = c[train].repeat(1 + len(calibrate.BENIGN), 1)
    # The threshold is a quantile of the 384 clean scores; at fpr 0.5 % it sits near their
    # top, so a held-out clean face is flagged with probability ~0.5 % (measured over 5
    # seeds of G and data: 1 of 320 held-out clean faces).
    profile = calibrate.fit(base, x_neg, c_neg, x_adv[:24], c[:24], fpr=0.005)
    guard = Guard(G, parser=face_parser, profile=profile, device="cpu")
    return {
        "x": x[test], "c": c[test], "x_adv": x_adv[24:], "y": y[24:], "y_adv": y_adv[24:],
        "mse_train": _mse(y_adv[:24], y[:24]), "profile": profile, "guard": guard,
        "clean": guard(x[test], c[test]), "attacked": guard(x_adv[24:], c[test]),
    }  # fmt: skip


@pytest.mark.slow
class TestEndToEnd:
    """PGD (ε 0.05, step 0.01, 10 steps) → calibrate → Guard on held-out faces (tests/conftest)."""

    def test_pgd_disrupts(self, run):
        mse = torch.cat([run["mse_train"], _mse(run["y_adv"], run["y"])])
        assert (mse > attacks.SUCCESS_MSE).all(), mse
        assert (run["x_adv"] - run["x"]).abs().max() <= 0.05 + 1e-6

    def test_calibrated(self, run):
        p = run["profile"]
        assert p.meta["auroc_train"] > 0.95 and p.meta["tpr_train"] > 0.9
        assert p.recnet.pretrained and len(p.recnet.pretrained) == len(p.recnet.layers)

    def test_flags_attacked_not_clean(self, run):
        clean, attacked = run["clean"], run["attacked"]
        assert not clean.disrupted.any(), clean.score
        assert attacked.disrupted.all(), attacked.score
        assert attacked.score.min() > clean.score.max()

    def test_clean_output_is_g_of_x(self, run, tiny_stargan):
        with torch.no_grad():
            torch.testing.assert_close(run["clean"].output, tiny_stargan(run["x"], run["c"]))
        assert torch.equal(run["clean"].purified, run["x"])

    def test_reconstruction_lowers_output_error(self, run):
        r, y = run["attacked"], run["y"]
        before, after = _mse(run["y_adv"], y), _mse(r.output, y)
        assert (after < before).all(), (before, after)
        assert after.mean() < 0.25 * before.mean()
        assert (r.score_after < r.score).all()
        assert all(r.chains)

    def test_replay_remakes_the_purified_faces_from_their_chains(self, run):
        guard = run["guard"]
        x = torch.cat([run["x"][:2], run["x_adv"]])
        r = guard(x, torch.cat([run["c"][:2], run["c"]]))
        assert any(st["name"] != "purifier" for ch in r.chains for st in ch)  # Rec-Net's steps
        torch.testing.assert_close(guard.replay(x, r.chains), r.purified, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="chains"):
            guard.replay(x, r.chains[:1])

    def test_replay_has_a_gradient_through_every_step(self, run):
        """BPDA: steps without a gradient (median, JPEG, …) pass it straight through."""
        guard, x_adv, first = run["guard"], run["x_adv"], run["attacked"]
        x = x_adv.clone().requires_grad_(True)
        out = guard.replay(x, first.chains, differentiable=True)
        torch.testing.assert_close(out.detach(), first.purified, atol=1e-5, rtol=0)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert (grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.slow
class TestHints:
    """``guard(x, c, hints=...)``: a chain that cures a disrupted face is kept without a search
    (the daemon passes a face's chain from the previous frame); anything else searches."""

    def test_a_curing_chain_is_reused_without_search(self, run, tiny_stargan):
        guard, x_adv, c, first = run["guard"], run["x_adv"], run["c"], run["attacked"]
        cured = first.score_after < first.threshold
        assert cured.any()
        searched, n_search = count_g_images(tiny_stargan, lambda: guard(x_adv, c))
        hinted, n_hint = count_g_images(
            tiny_stargan, lambda: guard(x_adv, c, hints=first.chains)
        )  # fmt: skip
        assert torch.equal(hinted.reused, cured)
        for i in cured.nonzero().flatten().tolist():
            assert hinted.chains[i] == first.chains[i]
        torch.testing.assert_close(hinted.purified[cured], first.purified[cured])
        assert (hinted.score_after[cured] < hinted.threshold).all()
        assert torch.equal(hinted.disrupted, searched.disrupted)  # the verdict is the input's
        assert n_hint < n_search / 5, (n_hint, n_search)

    def test_useless_or_foreign_hints_fall_back_to_the_search(self, run):
        guard, x_adv, c, first = run["guard"], run["x_adv"], run["c"], run["attacked"]
        n = len(x_adv)
        foreign = [{"name": "median", "params": {"k": 3}, "region": "no-such-patch", "layer": 0}]
        identity = [{"name": "jpeg", "params": {"quality": 100}, "region": "hair", "layer": 0}]
        for hints in ([None] * n, [[]] * n, [foreign] * n):
            r = guard(x_adv, c, hints=hints)
            assert not r.reused.any()
            assert r.chains == first.chains
        r = guard(x_adv, c, hints=[identity] * n)  # runs, but cannot cure: searched instead
        assert not r.reused.any() and r.chains == first.chains

    def test_clean_faces_ignore_hints(self, run):
        r = run["guard"](run["x"], run["c"], hints=run["attacked"].chains)
        assert not r.disrupted.any() and not r.reused.any() and not any(r.chains)
        assert torch.equal(r.purified, run["x"])

    def test_hints_length_is_checked(self, run):
        with pytest.raises(ValueError, match="hints"):
            run["guard"](run["x"], run["c"], hints=[None])
