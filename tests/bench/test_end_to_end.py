"""``python -m bench.end_to_end``: the whole-guard attack, its counts and its section."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bench import end_to_end as E
from magdr.metrics import psnr


class _Profile:
    threshold = 0.5


class _FakeGuard(nn.Module):
    """score = mean of x (so the gate is known), purifier halves x."""

    def __init__(self):
        super().__init__()
        self.profile = _Profile()
        self.purifier = lambda x: 0.5 * x
        self.purify_all = False

    def score(self, x, c):
        return x.flatten(1).mean(1)

    def forward(self, x, c):
        """The real guard's roads: faces whose mean is above the threshold get P (halved)."""
        self.runs = getattr(self, "runs", 0) + 1
        return SimpleNamespace(chains=[[{"name": "purifier"}] if s > 0.5 else []
                                       for s in self.score(x, c)])  # fmt: skip

    def replay(self, x, chains, differentiable=False):
        return torch.stack([0.5 * xi if ch else xi for xi, ch in zip(x, chains, strict=True)])


class _Tint(nn.Module):
    def forward(self, x, c):
        return torch.tanh(2 * x + c[:, :1, None, None])


def test_published_is_the_gated_mix_of_the_two_roads():
    G, guard = _Tint(), _FakeGuard()
    attack = E.GuardPGD(G, guard, temperature=0.2)
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    c = torch.ones(2, 5)
    gate = torch.sigmoid((x.flatten(1).mean(1) - 0.5) / (0.2 * 0.5)).reshape(-1, 1, 1, 1)
    want = (1 - gate) * G(x, c) + gate * G(0.5 * x, c)
    torch.testing.assert_close(attack.published(x, c), want)


def test_the_purifiers_road_and_purify_all_drop_the_gate():
    G, guard = _Tint(), _FakeGuard()
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    c = torch.ones(2, 5)
    torch.testing.assert_close(E.GuardPGD(G, guard, road="purifier").published(x, c), G(0.5 * x, c))
    guard.purify_all = True
    torch.testing.assert_close(E.GuardPGD(G, guard).published(x, c), G(0.5 * x, c))
    assert E.attacks_of(guard, ["gate", "purifier"], [0.1, 1]) == [
        {"road": "purifier", "temperature": 1.0}
    ]
    assert [a["road"] for a in E.attacks_of(guard, E.ATTACK_ROADS, [0.1, 1])] == [
        "purifier", "replay"
    ]  # fmt: skip
    guard.purify_all = False
    assert [a["road"] for a in E.attacks_of(guard, ["gate", "purifier"], [0.1, 1])] == [
        "gate", "gate", "purifier"
    ]  # fmt: skip
    guard.purifier = None  # G(x̂) or Rec-Net's output: no mix to weigh, no P to aim at
    assert E.attacks_of(guard, E.ATTACK_ROADS, [0.1, 1]) == [
        {"road": "gate", "temperature": 1.0}, {"road": "replay", "temperature": 1.0}
    ]  # fmt: skip
    with pytest.raises(ValueError, match="road"):
        E.GuardPGD(G, guard, road="evade")
    with pytest.raises(ValueError, match="refresh"):
        E.GuardPGD(G, guard, road="replay", refresh=0)


def test_the_replay_road_runs_the_real_guard_every_refresh_steps():
    """Faces above the threshold are halved by the guard: the replayed objective is G of that,
    with the guard's roads re-read at steps 0, 3 and 6 of 7."""
    G, guard = _Tint(), _FakeGuard()
    x = torch.stack([torch.full((3, 4, 4), 0.9), torch.full((3, 4, 4), -0.2)])
    c = torch.zeros(2, 5)
    attack = E.GuardPGD(G, guard, eps=0.05, step=0.01, steps=7, road="replay", refresh=3)
    x_adv = attack(x, c, generator=torch.Generator().manual_seed(0))
    assert guard.runs == 3
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    want = G(torch.stack([0.5 * x_adv[0], x_adv[1]]), c)
    objective = attack._objective(c, G(x, c))
    torch.testing.assert_close(objective(x_adv), E._mse(want, G(x, c)))


def test_attack_stays_in_the_ball_and_moves_the_published_output():
    G, guard = _Tint(), _FakeGuard()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4 - 0.2
    c = torch.zeros(3, 5)
    attack = E.GuardPGD(G, guard, eps=0.1, step=0.02, steps=10)
    x_adv = attack(x, c, generator=torch.Generator().manual_seed(1))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.abs().max() <= 1
    with torch.no_grad():
        before = E._mse(attack.published(x, c), G(x, c))
        after = E._mse(attack.published(x_adv, c), G(x, c))
    assert (after > before).all()


def test_strongest_keeps_each_faces_furthest_published_output():
    a = {"published": np.array([0.1, 0.9]), "flagged": np.array([True, False])}
    b = {"published": np.array([0.5, 0.2]), "flagged": np.array([False, True])}
    best = E.strongest([a, b])
    np.testing.assert_array_equal(best["published"], [0.5, 0.9])
    np.testing.assert_array_equal(best["flagged"], [False, False])


def test_summary_counts_and_section_row():
    att = {"published": np.array([0.2, 0.01, 0.0, 0.3]), "plain": np.array([0.3, 0.2, 0.0, 0.4]),
           "flagged": np.array([True, True, False, False]),
           "score": np.array([2.0, 3.0, 0.1, 0.2]), "road": np.array([1, 2, 0, 0])}  # fmt: skip
    s = E.summary(np.array([0.1, 0.2, 0.3, 0.4]), 1.0, att)
    assert (s["through"], s["flagged"], s["disrupting"], s["disrupting_unflagged"]) == (2, 2, 3, 1)
    assert s["f1"] == 2 * 2 / (2 * 2 + 0 + 1)
    assert s["through_by_road"] == {"passed": 1, "purifier": 1, "recnet": 0}
    s["seconds"] = 12.0
    run = {"command": "python -m bench.end_to_end", "commit": "abc", "machine": "2 CPU cores",
           "attack": "GuardPGD.", "clean_flagged": 0, "clean": 4, "eps": {"0.1": s},
           "clean_path": {"psnr_db": 50.0, "psnr_min_db": 40.0, "ms_per_face": 20.0,
                          "times_plain_g": 2.5, "reconstruction": {"PGD ε 0.05": {
                              "faces": 3, "guard_db": 30.0, "blur_db": 22.5,
                              "still_disrupted": 0}}}}  # fmt: skip
    text = E.section({"every face": {**run, "clean_path": None, "note": "Relabelled."},
                      "shipped": run})  # fmt: skip
    assert text.startswith("## Adaptive attacker\n")
    assert text.index("| shipped | 0.1 |") < text.index("| every face | 0.1 |")  # shipped first
    assert "GuardPGD. Relabelled.\n" in text and "GuardPGD.\n" in text
    assert "| shipped | 0.1 | 4 | 2/4 (50.0%) | 1 / 1 / 0 | 2/4 | 3/4 | 1 | 0.80 |" in text
    assert (
        "| shipped | 0/4 | 50.0 / 40.0 dB | 20.0 | 2.50 | 3, 30.0 / 22.5 dB (+7.5), 0 | – |" in text
    )
    assert "| every face | 0/4 | – | – | – | – | – |" in text


class _Steep(nn.Module):
    def forward(self, x, c):
        return torch.tanh(20 * x + c[:, :1, None, None])


def test_reconstruction_scores_the_guard_on_the_faces_pgd_disrupts():
    """Item 3's check: PGD disrupts every face of a steep G; a guard that publishes G(0) is
    scored on all of them against G(x, c), beside the blur baseline."""
    G = _Steep()
    x = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.02
    c = torch.zeros(4, 5)

    def guard(a, cc):
        return SimpleNamespace(output=G(torch.zeros_like(a), cc))

    rec = E.reconstruction(G, guard, x, c, batch=2)
    assert set(rec) == set(E.STANDARD_EPS)
    with torch.no_grad():
        want = float(psnr(G(torch.zeros_like(x), c), G(x, c)).mean())
    for r in rec.values():
        assert r["faces"] == 4 and r["still_disrupted"] == 0
        assert abs(r["guard_db"] - want) < 1e-4 and r["blur_db"] == r["blur_db"]


def test_results_of_one_run_are_the_shipped_guards(tmp_path):
    old = {"eps": {}, "clean": 1}
    (tmp_path / "r.json").write_text(json.dumps(old))
    assert E.load_results(tmp_path / "r.json") == {E.SHIPPED: old}
    (tmp_path / "r.json").write_text(json.dumps({"a": old}))
    assert E.load_results(tmp_path / "r.json") == {"a": old}
    assert E.load_results(tmp_path / "none.json") == {}


def test_render_rewrites_the_section_from_the_json_alone(tmp_path):
    row = {"faces": 4, "through": 1, "through_by_road": {"passed": 0, "purifier": 1, "recnet": 0},
           "flagged": 4, "disrupting": 0, "disrupting_unflagged": 0, "f1": float("nan"),
           "auroc": float("nan"), "seconds": 3.0}  # fmt: skip
    run = {"command": "python -m bench.end_to_end", "commit": "abc", "machine": "2 CPU cores",
           "attack": "GuardPGD.", "clean_flagged": 0, "clean": 4, "eps": {"0.1": row}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps({"shipped": run}))
    report = tmp_path / "REPORT.md"
    report.write_text("# Report\n\n## Adaptive attacker\n\nold\n")
    argv = ["--render", "--json", str(tmp_path / "r.json"), "--report", str(report)]
    assert E.main(argv) == 0
    text = report.read_text()
    assert "old" not in text and "| shipped | 0.1 | 4 | 1/4 (25.0%) | 0 / 1 / 0 |" in text
    assert (tmp_path / E.FIGURE).is_file()
    with pytest.raises(SystemExit):
        E.main(["--render", "--json", str(tmp_path / "r.json")])


def test_road_of_a_face():
    assert E._road(False, []) == 0
    assert E._road(True, [{"name": "purifier"}]) == 1
    assert E._road(True, [{"name": "purifier"}, {"name": "jpeg", "region": "hair"}]) == 2


def test_figure_draws_every_configuration(tmp_path):
    row = {"faces": 16, "through": 2}
    res = {"a": {"eps": {"0.05": row, "0.1": {**row, "through": 8}}}, "b": {"eps": {"0.1": row}}}
    E.figure(res, tmp_path / E.FIGURE)
    assert (tmp_path / E.FIGURE).stat().st_size > 1000
