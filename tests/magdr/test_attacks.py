from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magdr import attacks
from magdr.check import ShapeError
from magdr.models.stargan import StarGAN

EPS = 0.05


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random smooth colour images in (-1, 1): bicubic upsampling of a 4×4 noise grid."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 4, 4, generator=g)
    return torch.tanh(F.interpolate(z, size=size, mode="bicubic", align_corners=False))


def tiny_stargan(seed: int = 0) -> StarGAN:
    torch.manual_seed(seed)
    return StarGAN(conv_dim=8, c_dim=5, repeat_num=1, image_size=32)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def out_mse(G, x_adv, x, c) -> float:
    """MSE(G(x_adv, c), G(x, c)), mean over the batch: the disruption of Ruiz et al."""
    with torch.no_grad():
        return mse(G(x_adv, c), G(x, c)).mean().item()


def sign_noise(x: torch.Tensor, eps: float = EPS, seed: int = 1) -> torch.Tensor:
    """Random ±ε noise: the same L∞ budget as the attacks, no gradient information."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, x.shape, generator=g).to(x) * 2 - 1
    return (x + eps * s).clamp(-1, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run several times faster on one thread than on an oversubscribed pair."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def G() -> StarGAN:
    return tiny_stargan()


@pytest.fixture(scope="module")
def xc() -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.zeros(2, 5)
    c[:, 1] = 1  # Blond_Hair
    return smooth_images(2), c


@pytest.fixture(scope="module")
def trained_G() -> StarGAN:
    """A tiny StarGAN briefly trained as an identity auto-encoder (≈ what a trained G learns
    first); trained generators are far more sensitive to directed perturbations than random
    ones are, relative to random noise."""
    G = tiny_stargan(1)
    opt = torch.optim.Adam(G.parameters(), 2e-3)
    for i in range(100):
        xb = smooth_images(4, seed=100 + i)
        loss = F.l1_loss(G(xb, torch.zeros(4, 5)), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return G.requires_grad_(False)


def blur(x: torch.Tensor) -> torch.Tensor:
    """A differentiable defence transform (3×3 box blur)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """A non-differentiable defence transform (numpy round trip to 16 levels)."""
    a = np.round((x.detach().cpu().numpy() + 1) * 7.5) / 7.5 - 1
    return torch.from_numpy(a).to(x)


# Every L∞ attack, called the same way: (G, x, c, generator) -> x_adv.
LINF = {
    "pgd": lambda G, x, c, g: attacks.pgd(G, x, c, steps=3, generator=g),
    "ifgsm": lambda G, x, c, g: attacks.ifgsm(G, x, c, steps=3),
    "targeted": lambda G, x, c, g: attacks.targeted(G, x, c, -x.flip(0), steps=3),
    "adaptive": lambda G, x, c, g: attacks.adaptive_pgd(
        G, x, c, transforms=[blur, quantise], steps=3, eot_samples=2, generator=g
    ),
}


class TestBudget:
    @pytest.mark.parametrize("name", list(LINF))
    def test_within_eps_and_range(self, G, name):
        x = smooth_images(2, seed=3)
        x[0, :, :4] = 1.0  # saturated pixels: the range clamp must bite there
        x[1, :, :4] = -1.0
        c = torch.zeros(2, 5)
        x_adv = LINF[name](G, x, c, torch.Generator().manual_seed(0))
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= -1 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > EPS / 2  # it moved

    def test_cw_in_range(self, G, xc):
        x, c = xc
        x_adv = attacks.cw_l2(G, x, c, steps=5)
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= -1 and x_adv.max() <= 1

    def test_eps_zero_and_steps_zero(self, G, xc):
        x, c = xc
        assert torch.equal(attacks.pgd(G, x, c, eps=0.0), x)
        assert torch.equal(attacks.ifgsm(G, x, c, steps=0), x)
        # PGD with no iterations is its random start.
        x0 = attacks.pgd(G, x, c, steps=0, generator=torch.Generator().manual_seed(0))
        assert 0 < (x0 - x).abs().max() <= EPS


class TestPGD:
    def test_beats_random_noise(self, G, xc):
        x, c = xc
        x_adv = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(0))
        assert out_mse(G, x_adv, x, c) > 3 * out_mse(G, sign_noise(x), x, c)

    def test_trained_generator_ruiz_defaults(self, trained_G):
        # Measured: PGD ≈ 0.005 vs ±ε noise ≈ 0.0001 (×60); I-FGSM about the same as PGD.
        G, x, c = trained_G, smooth_images(4, seed=7), torch.zeros(4, 5)
        noise = out_mse(G, sign_noise(x), x, c)
        x_pgd = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(0))
        assert out_mse(G, x_pgd, x, c) > 20 * noise
        assert out_mse(G, attacks.ifgsm(G, x, c), x, c) > 20 * noise

    def test_seeded(self, G, xc):
        x, c = xc

        def run(seed: int) -> torch.Tensor:
            return attacks.pgd(G, x, c, steps=2, generator=torch.Generator().manual_seed(seed))

        assert torch.equal(run(0), run(0))
        assert not torch.equal(run(0), run(1))

    def test_class_equals_function(self, G, xc):
        x, c = xc
        a = attacks.PGD(G, eps=0.03, step=0.01, steps=2)(
            x, c, generator=torch.Generator().manual_seed(5)
        )
        b = attacks.pgd(G, x, c, 0.03, 0.01, 2, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        assert "eps=0.03" in repr(attacks.PGD(G, eps=0.03))

    def test_reference(self, G, xc):
        x, c = xc
        with torch.no_grad():
            r = G(x, c)
        plain = attacks.ifgsm(G, x, c, steps=2)
        assert torch.equal(attacks.ifgsm(G, x, c, steps=2, reference=r), plain)
        other = attacks.ifgsm(G, x, c, steps=2, reference=r.flip(0))
        assert not torch.equal(other, plain)
        with pytest.raises(ShapeError):
            attacks.ifgsm(G, x, c, steps=1, reference=r[:, :, :16])

    def test_works_under_no_grad(self, G, xc):
        x, c = xc
        with torch.no_grad():
            x_adv = attacks.ifgsm(G, x, c, steps=2)
        assert torch.equal(x_adv, attacks.ifgsm(G, x, c, steps=2))


class TestIFGSM:
    def test_deterministic_and_moves(self, G, xc):
        x, c = xc
        a, b = attacks.ifgsm(G, x, c), attacks.ifgsm(G, x, c)
        assert torch.equal(a, b)
        # The gradient of MSE(G(x), G(x)) vanishes at x: without the probe it would not move.
        assert (a - x).abs().max() > EPS / 2
        assert torch.equal(attacks.IFGSM(G)(x, c), a)

    def test_is_pgd_without_random_start(self, G, xc):
        x, c = xc
        assert torch.equal(
            attacks.ifgsm(G, x, c, steps=3), attacks.pgd(G, x, c, steps=3, random_start=False)
        )


class TestTargeted:
    def test_reduces_distance_to_target(self, trained_G):
        G, x, c = trained_G, smooth_images(2, seed=11), torch.zeros(2, 5)
        x_pgd = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            far = G(smooth_images(2, seed=12), c)  # another face's output: out of reach
            near = G(x_pgd, c)  # an output that some x' in the ε-ball makes
            before_far, before_near = mse(G(x, c), far), mse(G(x, c), near)
        x_far = attacks.targeted(G, x, c, far)
        x_near = attacks.targeted(G, x, c, near)
        with torch.no_grad():
            after_far, after_near = mse(G(x_far, c), far), mse(G(x_near, c), near)
        # Measured: far 0.63 -> 0.57; near 0.0058 -> 0.0001.
        assert (after_far < 0.95 * before_far).all()
        assert (after_near < 0.1 * before_near).all()
        assert (x_far - x).abs().max() <= EPS + 1e-6

    def test_class_and_bad_target(self, G, xc):
        x, c = xc
        t = -x
        assert torch.equal(
            attacks.Targeted(G, steps=2)(x, c, t), attacks.targeted(G, x, c, t, steps=2)
        )
        with pytest.raises(TypeError, match="target"):
            attacks.targeted(G, x, c, None)
        with pytest.raises(ShapeError):
            attacks.targeted(G, x, c, t[:1, :, :8])


class TestCWL2:
    def test_smaller_l2_than_pgd_for_a_success(self, G, xc):
        # Random tiny G, measured: C&W reaches MSE ≈ 0.053 (> 0.05, a success) with an RMS
        # perturbation ≈ 0.037; PGD (MSE ≈ 0.09) uses ≈ 0.042.
        x, c = xc
        x_cw = attacks.cw_l2(G, x, c, steps=60)
        x_pgd = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            dist = mse(G(x_cw, c), G(x, c))
        assert (dist > attacks.SUCCESS_MSE).all()
        assert (mse(x_cw, x) < mse(x_pgd, x)).all()

    def test_trained_generator_disrupted(self, trained_G):
        # Measured: MSE 0.052 (noise: 7e-5), but with an RMS perturbation ≈ 0.14 (L∞ ≈ 0.3):
        # the trained tiny G needs far more than PGD's ε-ball for a success.
        G, x, c = trained_G, smooth_images(2, seed=7), torch.zeros(2, 5)
        x_cw = attacks.cw_l2(G, x, c, steps=60)
        assert out_mse(G, x_cw, x, c) > 20 * out_mse(G, sign_noise(x), x, c)

    def test_binary_search_and_class(self, G, xc):
        x, c = xc
        a = attacks.CWL2(G, const=0.1, steps=5, binary_steps=2)(x, c)
        b = attacks.cw_l2(G, x, c, const=0.1, steps=5, binary_steps=2)
        assert torch.equal(a, b)  # deterministic: the probe start is fixed


class GuardStub:
    """A guard as the adaptive attack sees it: profile transforms and a differentiable score."""

    def __init__(self) -> None:
        self.net = torch.nn.Conv2d(3, 1, 3, padding=1)  # makes it a module holder
        self.profile = SimpleNamespace(
            consistency=[
                {"name": "jpeg", "params": {"quality": 75}},
                {"name": "gaussian_blur", "params": {"sigma": 0.8}},
            ],
            recnet_transforms=lambda: [
                {"name": "median", "params": {"k": 3}},
                {"name": "gaussian_blur", "params": {"sigma": 0.8}},  # a duplicate
            ],
        )

    def score(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """High-frequency energy: what a distortion detector reacts to."""
        return (x - blur(x)).abs().flatten(1).mean(1)


class TestAdaptive:
    def test_pool_from_guard(self, G):
        a = attacks.AdaptivePGD(G, guard=GuardStub())
        names = [f["name"] if isinstance(f, dict) else "identity" for f in a.pool]
        assert names == ["identity", "jpeg", "gaussian_blur", "median"]
        a = attacks.AdaptivePGD(G, guard=GuardStub(), include_identity=False)
        assert len(a.pool) == 3

    def test_bpda_moves_through_non_differentiable(self, trained_G):
        # Only JPEG and median (no identity): without BPDA there would be no gradient at all.
        G, x, c = trained_G, smooth_images(2, seed=7), torch.zeros(2, 5)
        pool = [{"name": "jpeg", "params": {"quality": 75}}, {"name": "median", "params": {"k": 3}}]
        x_adv = attacks.adaptive_pgd(
            G, x, c, transforms=pool, include_identity=False, steps=5, eot_samples=None,
            random_start=False,
        )  # fmt: skip
        assert (x_adv - x).abs().max() > EPS / 2
        assert out_mse(G, x_adv, x, c) > 10 * out_mse(G, sign_noise(x), x, c)
        # BPDA for plain callables too.
        x_q = attacks.adaptive_pgd(
            G, x, c, transforms=[quantise], include_identity=False, steps=2, random_start=False
        )
        assert (x_q - x).abs().max() > EPS / 4

    def test_eot_beats_plain_pgd_through_the_defence(self, G):
        # A random G reacts to fine detail that a blur removes: plain PGD's perturbation mostly
        # dies in the blur (measured 0.0035), the one made through it survives (0.028).
        x, c = smooth_images(4, seed=7), torch.zeros(4, 5)
        x_pgd = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(0))
        x_eot = attacks.adaptive_pgd(
            G, x, c, transforms=[blur], include_identity=False, steps=10,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        with torch.no_grad():
            y = G(x, c)
            through = [mse(G(blur(xa), c), y).mean().item() for xa in (x_pgd, x_eot)]
        assert through[1] > 3 * through[0]

    def test_evade_weight_lowers_the_score(self, G, xc):
        x, c = xc
        guard = GuardStub()
        kw = dict(guard=guard, steps=5, eot_samples=2)
        plain = attacks.adaptive_pgd(G, x, c, generator=torch.Generator().manual_seed(0), **kw)
        evade = attacks.adaptive_pgd(
            G, x, c, evade_weight=100.0, generator=torch.Generator().manual_seed(0), **kw
        )
        assert (guard.score(evade, c) < guard.score(plain, c)).all()

    def test_seeded(self, G, xc):
        x, c = xc

        def run(seed: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return attacks.adaptive_pgd(G, x, c, guard=GuardStub(), steps=2, generator=g)

        assert torch.equal(run(0), run(0))

    def test_real_guard(self):
        from magdr.faces.parsenet import ParseNet
        from magdr.faces.parsing import ParseNetParser
        from magdr.guard import Guard
        from magdr.profile import Profile

        G = tiny_stargan(2)
        torch.manual_seed(0)
        parser = ParseNetParser(ParseNet(width=4, depth=2))
        guard = Guard(G, parser=parser, profile=Profile(), device="cpu")
        guard.train()
        x, c = smooth_images(2, seed=5), torch.zeros(2, 5)
        g = torch.Generator().manual_seed(0)
        x_adv = attacks.adaptive_pgd(
            G, x, c, guard=guard, steps=2, eot_samples=2, evade_weight=1.0, generator=g
        )
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert guard.training and all(m.training for m in guard.modules())
        assert len(attacks.AdaptivePGD(G, guard=guard).pool) > len(guard.profile.consistency)


class TestState:
    def test_mode_and_requires_grad_restored(self, xc):
        x, c = xc
        G = tiny_stargan()
        G.train()
        G.main[0].eval()  # a mixed-mode model stays mixed
        first = next(G.parameters())
        first.requires_grad_(False)
        modes = [m.training for m in G.modules()]
        flags = [p.requires_grad for p in G.parameters()]
        for run in LINF.values():
            run(G, x, c, torch.Generator().manual_seed(0))
        attacks.cw_l2(G, x, c, steps=2)
        assert [m.training for m in G.modules()] == modes
        assert [p.requires_grad for p in G.parameters()] == flags
        assert all(p.grad is None for p in G.parameters())

    def test_restored_after_an_error(self, xc):
        x, c = xc
        G = tiny_stargan().train()
        with pytest.raises(ShapeError):
            attacks.pgd(G, x, c, reference=torch.zeros(2, 3, 8, 8))
        assert G.training and all(p.requires_grad for p in G.parameters())

    def test_frozen_during_the_attack(self, xc):
        x, c = xc
        seen = []
        G = tiny_stargan()

        def spy(module, inputs, output):
            seen.append((module.training, any(p.requires_grad for p in G.parameters())))

        handle = G.register_forward_hook(spy)
        try:
            attacks.ifgsm(G.train(), x, c, steps=1)
        finally:
            handle.remove()
        assert seen and all(s == (False, False) for s in seen)


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"eps": -0.1}, ValueError),
            ({"eps": float("nan")}, ValueError),
            ({"step": -1.0}, ValueError),
            ({"steps": -1}, ValueError),
            ({"steps": 2.5}, TypeError),
            ({"steps": True}, TypeError),
            ({"eps": "0.05"}, TypeError),
        ],
    )
    def test_pgd_settings(self, G, xc, kwargs, error):
        x, c = xc
        with pytest.raises(error):
            attacks.pgd(G, x, c, **kwargs)
        with pytest.raises(error):
            attacks.PGD(G, **kwargs)

    def test_inputs(self, G, xc):
        x, c = xc
        with pytest.raises(ShapeError):
            attacks.pgd(G, x[0], c)
        with pytest.raises(TypeError):
            attacks.pgd(G, x.numpy(), c)
        with pytest.raises(TypeError, match="floating"):
            attacks.pgd(G, (x * 100).long(), c)
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            attacks.pgd(G, x * 3, c)
        with pytest.raises(ShapeError, match="c:"):
            attacks.pgd(G, x, c[:1])
        with pytest.raises(TypeError):
            attacks.PGD("not a model")

    def test_cw_settings(self, G):
        for kw in ({"const": 0.0}, {"lr": 0.0}, {"binary_steps": 0}, {"steps": -2}):
            with pytest.raises(ValueError):
                attacks.CWL2(G, **kw)

    def test_adaptive_settings(self, G):
        with pytest.raises(ValueError, match="guard or a transforms"):
            attacks.AdaptivePGD(G)
        with pytest.raises(ValueError, match="score"):
            attacks.AdaptivePGD(G, transforms=[blur], evade_weight=1.0)
        with pytest.raises(ValueError):
            attacks.AdaptivePGD(G, transforms=[blur], eot_samples=0)
        with pytest.raises(ValueError):
            attacks.AdaptivePGD(G, transforms=[blur], evade_weight=-1.0)
        with pytest.raises(TypeError):
            attacks.AdaptivePGD(G, transforms=[3])
        with pytest.raises(ValueError, match="name"):
            attacks.AdaptivePGD(G, transforms=[{"params": {}}])
        with pytest.raises(ValueError, match="empty"):
            attacks.AdaptivePGD(G, transforms=[], include_identity=False)


class TestDevicesAndDtypes:
    def test_float64(self, xc):
        x, c = xc
        G = tiny_stargan().double()
        for run in LINF.values():
            x_adv = run(G, x.double(), c.double(), torch.Generator().manual_seed(0))
            assert x_adv.dtype == torch.float64
            assert (x_adv - x.double()).abs().max() <= EPS + 1e-12

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda(self, xc):
        x, c = (t.cuda() for t in xc)
        G = tiny_stargan().cuda()
        for g in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0), None):
            x_adv = attacks.pgd(G, x, c, generator=g)
            assert x_adv.device == x.device and (x_adv - x).abs().max() <= EPS + 1e-6
        assert attacks.ifgsm(G, x, c).is_cuda and attacks.cw_l2(G, x, c, steps=3).is_cuda
        pool = [{"name": "jpeg", "params": {"quality": 75}}, {"name": "median", "params": {"k": 3}}]
        g = torch.Generator("cuda").manual_seed(0)
        x_adv = attacks.adaptive_pgd(G, x, c, transforms=pool, steps=3, generator=g)
        assert x_adv.is_cuda and (x_adv - x).abs().max() <= EPS + 1e-6
