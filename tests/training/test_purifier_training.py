"""Training the learned purifier (``python -m training.purifier``): its losses, the command,
the adversarial rounds' attacker."""

from __future__ import annotations

import pytest
import torch

import magdr
from magdr import attacks
from magdr.checkpoints import weights_digest
from magdr.profile import load_profile
from magdr.purifier import Purifier, load_purifier
from magdr.transforms import apply
from tests.conftest import synthetic_conditions, synthetic_faces
from training.purifier import (
    DetectorHinge,
    Purified,
    adaptive_pool,
    distill_loss,
    purifier_loss,
    robust_attack,
)
from training.purifier import main as train_main


def _faces(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return synthetic_faces(n, torch.Generator().manual_seed(seed), size=size)


@pytest.mark.slow
def test_the_loss_teaches_it_to_undo_pgd(tiny_stargan):
    """A few hundred steps of the training loss on a tiny G: held-out PGD faces come out far
    closer to G's clean output, and clean faces stay as they are."""
    G = tiny_stargan
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(11)
    x, c = synthetic_faces(72, g), synthetic_conditions(72, g)
    x_adv = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        y = G(x, c)
    tr, te = slice(0, 56), slice(56, 72)
    P = Purifier(width=8)
    opt = torch.optim.Adam(P.parameters(), lr=2e-3)
    rng = torch.Generator().manual_seed(13)
    for _ in range(150):
        i = torch.randint(0, 56, (8,), generator=rng)
        j = torch.randint(0, 56, (4,), generator=rng)
        terms = purifier_loss(P, G, x_adv[tr][i], c[tr][i], y[tr][i], x[tr][i],
                              x[tr][j], c[tr][j], y[tr][j], beta=0.5, gamma=1.0)  # fmt: skip
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    with torch.no_grad():
        before = (G(x_adv[te], c[te]) - y[te]).square().mean()
        after = (G(P(x_adv[te]), c[te]) - y[te]).square().mean()
        clean = (G(P(x[te]), c[te]) - y[te]).square().mean()
    assert after < 0.3 * before, (before, after)
    assert clean < 0.1 * before, (clean, before)


def test_distillation_learns_the_teacher():
    """``--teacher``'s loss: a smaller P comes to give what a trained P gives, on held-out faces."""
    torch.manual_seed(0)
    T = Purifier(width=8)
    torch.nn.init.normal_(T.head.weight, std=0.05)  # a teacher that changes faces
    T.eval()
    x, x_adv = _faces(48, 1), _faces(48, 2)
    with torch.no_grad():
        t, t_adv = T(x), T(x_adv)
    P = Purifier(width=4)
    opt = torch.optim.Adam(P.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(3)
    for _ in range(150):
        i = torch.randint(0, 40, (8,), generator=rng)
        terms = distill_loss(P, x_adv[i], t_adv[i], x[i], t[i], gamma=1.0)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    with torch.no_grad():
        before = (x_adv[40:] - t_adv[40:]).abs().mean()  # the untrained P is the identity
        after = (P(x_adv[40:]) - t_adv[40:]).abs().mean()
    assert after < 0.5 * before, (before, after)


def test_training_command_smoke(tmp_path):
    out = tmp_path / "p.pt"
    train_main(["--smoke", "--out", str(out)])
    P = load_purifier(out)
    assert P.meta["steps"] == 2 and P.meta["attacks"] == ["pgd", "ifgsm", "cw"]
    assert P.meta["cw_steps"] == 1 and P.meta["ssim"] == 0.5
    small = tmp_path / "small.pt"
    train_main(["--smoke", "--teacher", str(out), "--out", str(small)])
    assert load_purifier(small).meta["teacher"] == {"path": str(out), "digest": weights_digest(P)}
    assert P.meta["generator_digest"] == weights_digest(magdr.load_generator("default"))


def test_adversarial_training_command_smoke(tmp_path):
    """``--adversarial 2``: two rounds of attacks against P, each reported in P's metadata."""
    out = tmp_path / "p.pt"
    train_main(["--smoke", "--adversarial", "2", "--out", str(out)])
    adv = load_purifier(out).meta["adversarial"]
    assert len(adv["rounds"]) == 2 and adv["eps"] == 0.1
    assert set(adv["rounds"][0]) == {"disrupt", "evade", "clean_max", "scale", "seconds"}
    assert adv["threshold"] == load_profile("default").threshold
    with pytest.raises(SystemExit):  # the teacher's loss has no G to attack through
        train_main(["--smoke", "--adversarial", "1", "--teacher", str(out), "--out", str(out)])


def test_robust_training_command_smoke(tmp_path):
    """``--robust``: online attacks through G∘P, their settings in P's metadata."""
    out = tmp_path / "p.pt"
    train_main(["--smoke", "--robust", "0.5", "--robust-eps", "0.05", "--out", str(out)])
    assert load_purifier(out).meta["robust"] == {"share": 0.5, "eps": [0.05], "steps": 1}
    for bad in (["--robust", "2"], ["--robust", "0.5", "--teacher", str(out)]):
        with pytest.raises(SystemExit):
            train_main(["--smoke", *bad, "--out", str(tmp_path / "q.pt")])


def test_robust_attack_beats_the_purifier_not_g_alone(tiny_stargan):
    """``--robust``'s faces move G(P(x̂)) away from G(x), within ε, with P's weights untouched
    and still trainable."""
    G = tiny_stargan
    g = torch.Generator().manual_seed(31)
    x, c = synthetic_faces(4, g), synthetic_conditions(4, g)
    P = _Blur()
    with torch.no_grad():
        y = G(x, c)
    x_adv = robust_attack(G, P, x, c, y, eps=0.05, steps=5, generator=torch.Generator())
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and not x_adv.requires_grad
    with torch.no_grad():
        assert ((Purified(G, P)(x_adv, c) - y) ** 2).mean() > ((G(P(x), c) - y) ** 2).mean()
    Q = Purifier(width=4)
    robust_attack(G, Q, x, c, y, eps=0.05, steps=1, generator=torch.Generator())
    assert all(q.requires_grad for q in Q.parameters()) and Q.training


class _Blur(torch.nn.Module):
    """A stand-in detector purifier that moves any perturbation: a Gaussian blur."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply("gaussian_blur", x, sigma=1.0)


def test_adaptive_pool_pushes_the_detector_score_under_its_threshold(tiny_stargan):
    """The attacker of ``--adversarial`` disrupts G and, with λ_e > 0, keeps S = MSE(G(x̂),
    G(P(x̂))) lower than the same attack without the evasion term, within its ε-ball."""
    G = tiny_stargan
    g = torch.Generator().manual_seed(21)
    x, c = synthetic_faces(8, g), synthetic_conditions(8, g)
    with torch.no_grad():
        clean = DetectorHinge(G, _Blur(), 0.0, 1.0).consistency(x, c)
    hinge = DetectorHinge(G, _Blur(), float(clean.max()), float(clean.std()))
    plain = adaptive_pool(hinge, x, c, eps=0.1, steps=10, evade_weight=0.0, seed=0)
    evading = adaptive_pool(hinge, x, c, eps=0.1, steps=10, evade_weight=1.0, seed=0)
    assert (evading - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        s_plain, s_evading = hinge.consistency(plain, c), hinge.consistency(evading, c)
    assert s_evading.mean() < 0.5 * s_plain.mean(), (s_plain, s_evading)
