"""Calibration: AUROC, the fitted μ/σ, w, λ and threshold, and Rec-Net pretraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magdr import attacks, calibrate
from magdr.calibrate import (
    BENIGN,
    auroc,
    benign_copies,
    choose_threshold,
    fit,
    separation_margin,
)
from magdr.guard import Guard
from magdr.models.stargan import StarGAN
from magdr.profile import Profile
from magdr.transforms import apply
from tests.conftest import synthetic_faces

SIZE = 16


class TestAUROC:
    def test_hand_values(self):
        # Pairs (pos > neg): 0.3>0.1, 0.3>0.2, 0.15>0.1, 0.15<0.2 -> 3/4.
        assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.15])) == 0.75
        assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
        assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0

    def test_ties_count_half(self):
        assert auroc([0.5], [0.5]) == 0.5
        # 0.5 vs 0.1 win, 0.5 vs 0.5 tie, 0.9 beats both: (1 + 0.5 + 1 + 1) / 4.
        assert auroc([0.1, 0.5], [0.5, 0.9]) == 0.875
        assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5

    def test_matches_pair_count(self):
        rng = np.random.default_rng(0)
        neg, pos = rng.integers(0, 5, 30).astype(float), rng.integers(2, 7, 20).astype(float)
        pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
        assert auroc(neg, pos) == pytest.approx(pairs)
        assert auroc(torch.tensor(neg), torch.tensor(pos)) == pytest.approx(pairs)

    def test_empty_is_nan(self):
        assert math.isnan(auroc([], [1.0]))
        assert math.isnan(auroc([1.0], []))


class TestChooseThreshold:
    def test_separated_scores_give_the_middle_of_the_gap(self):
        neg, pos = torch.tensor([0.1, 0.3, 0.2]), torch.tensor([1.2, 0.75])
        # Geometric: as many times above the highest clean score as below the lowest attacked.
        assert choose_threshold(neg, pos) == (pytest.approx((0.3 * 0.75) ** 0.5), "gap-midpoint")
        neg, pos = torch.tensor([-0.3, -0.1]), torch.tensor([0.5])  # ends not both positive
        assert choose_threshold(neg, pos) == (pytest.approx(0.2), "gap-midpoint")

    def test_clean_margin_moves_it_towards_the_clean_end(self):
        neg, pos = torch.tensor([0.1, 0.3, 0.2]), torch.tensor([1.2, 0.75])
        # 1.5 × 0.3 = 0.45 lies below the middle √(0.3 · 0.75) ≈ 0.474: the cut moves there.
        assert choose_threshold(neg, pos, clean_margin=1.5) == (pytest.approx(0.45), "gap-margin")
        # 2 × 0.3 = 0.6 would flag less of the gap than the middle: the middle stays.
        t, rule = choose_threshold(neg, pos, clean_margin=2.0)
        assert rule == "gap-midpoint" and t == pytest.approx((0.3 * 0.75) ** 0.5)
        # Overlapping scores: the margin applies to the interval J picked, as the middle does.
        neg, pos = torch.arange(100) / 100, torch.cat([torch.tensor([0.5]), torch.full((50,), 2.0)])
        assert choose_threshold(neg, pos, fpr=0.05, clean_margin=1.2) == (
            pytest.approx(0.99 * 1.2),
            "youden-margin",
        )

    def test_one_attacked_outlier_does_not_pull_it_to_the_quantile(self):
        # 100 clean scores 0.00..0.99, 50 attacked at 2.0 and one hidden at 0.5: the clean 95%
        # quantile (0.94) would flag 5% of the clean faces to catch it; J prefers the gap above
        # the clean scores (FPR 0, TPR 50/51).
        neg = torch.arange(100) / 100
        pos = torch.cat([torch.tensor([0.5]), torch.full((50,), 2.0)])
        t, rule = choose_threshold(neg, pos, fpr=0.05)
        assert rule == "youden-midpoint" and t == pytest.approx((0.99 * 2.0) ** 0.5)

    def test_never_exceeds_the_fpr_cap(self):
        # Attacked scores spread over the top of the clean ones: J alone would go lower than the
        # cap allows; the cut stays where at most 10% of the clean scores are above it.
        g = torch.Generator().manual_seed(0)
        neg, pos = torch.randn(200, generator=g), torch.randn(80, generator=g) + 1.0
        t, rule = choose_threshold(neg, pos, fpr=0.1)
        assert rule == "youden-midpoint"
        assert float((neg > t).double().mean()) <= 0.1
        assert float((neg > t).double().mean()) > 0.05  # the cap binds: J wants more recall

    def test_without_attacked_scores_the_clean_quantile(self):
        neg = torch.arange(101, dtype=torch.float64)
        assert choose_threshold(neg, torch.empty(0), fpr=0.1) == (
            pytest.approx(90.0),
            "clean-quantile",
        )


def test_separation_margin_hand_value():
    neg = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # std 1.5811
    pos = torch.tensor([10.0, 10.0, 10.0])
    # q_0(pos) = 10, q_1(neg) = 4 -> (10 - 4) / 1.5811
    assert separation_margin(neg, pos, fpr=0.0) == pytest.approx(6 / 1.5811, rel=1e-4)
    assert separation_margin(pos, neg, fpr=0.0) < 0
    assert separation_margin(neg[:1], pos) == float("-inf")


def test_benign_copies():
    x = synthetic_faces(3, torch.Generator().manual_seed(0), size=SIZE)
    out = benign_copies(x)
    assert out.shape == (3 * len(BENIGN), 3, SIZE, SIZE)
    for k, t in enumerate(BENIGN):
        torch.testing.assert_close(out[3 * k : 3 * (k + 1)], apply(t["name"], x, **t["params"]))


@pytest.fixture(scope="module")
def setup(face_parser):
    torch.manual_seed(0)
    G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=SIZE).eval()
    g = torch.Generator().manual_seed(3)
    x = synthetic_faces(8, g, size=SIZE)
    c = torch.eye(5)[torch.arange(8) % 3]
    x_adv = attacks.pgd(G, x, c, generator=torch.Generator().manual_seed(4))
    x_neg, c_neg = torch.cat([x, benign_copies(x)]), c.repeat(1 + len(BENIGN), 1)
    base = Guard(G, parser=face_parser, profile=Profile(), device="cpu")
    profile = fit(base, x_neg, c_neg, x_adv, c, fpr=0.1, pretrain_recnet=False, name="t")
    return {
        "G": G,
        "base": base,
        "profile": profile,
        "x_neg": x_neg,
        "c_neg": c_neg,
        "x_adv": x_adv,
        "c": c,
    }


class TestFit:
    def test_threshold_rule(self, setup, face_parser):
        p = setup["profile"]
        guard = Guard(setup["G"], parser=face_parser, profile=p, device="cpu")
        s_neg = guard.detect(setup["x_neg"], setup["c_neg"]).score
        s_pos = guard.detect(setup["x_adv"], setup["c"]).score
        if float(s_neg.max()) < float(s_pos.min()):
            # Fully separated training scores: the middle of the gap, no training false alarm.
            assert p.meta["threshold_rule"] == "gap-midpoint"
            mid = (float(s_neg.max()) * float(s_pos.min())) ** 0.5
            assert p.threshold == pytest.approx(mid, rel=1e-5)
            assert p.meta["fpr_train"] == 0.0 and p.meta["tpr_train"] == 1.0
        else:
            assert p.meta["threshold_rule"] == "youden-midpoint"
            assert p.threshold == pytest.approx(choose_threshold(s_neg, s_pos, 0.1)[0], rel=1e-5)
            fpr = float((s_neg > p.threshold).double().mean())
            assert fpr <= 0.1 and p.meta["fpr_train"] == pytest.approx(fpr)

    def test_mu_sigma_from_clean_non_target_regions(self, setup, face_parser):
        p, G = setup["profile"], setup["G"]
        det = setup["base"].detect(setup["x_neg"], setup["c_neg"])
        regions = setup["base"].regions(setup["x_neg"])
        keep = (regions.mean((2, 3)) >= p.min_region_area) & (
            G.target_regions(setup["c_neg"]) < 0.5
        )
        vals = det.excess[keep]  # [n, M]
        torch.testing.assert_close(torch.tensor(p.mu), vals.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(p.sigma), vals.std(0), rtol=1e-4, atol=1e-6)

    def test_with_a_reference_fits_the_excess_and_keeps_it(self, setup, face_parser):
        ref = {"name": "median", "params": {"k": 3}}
        base = Guard(setup["G"], parser=face_parser, profile=Profile(reference=ref), device="cpu")
        x_neg, c_neg = setup["x_neg"], setup["c_neg"]
        p = fit(base, x_neg, c_neg, setup["x_adv"], setup["c"], fpr=0.1, pretrain_recnet=False)
        assert p.reference == ref
        det = base.detect(x_neg, c_neg)
        keep = (base.regions(x_neg).mean((2, 3)) >= p.min_region_area) & (
            setup["G"].target_regions(c_neg) < 0.5
        )
        vals = det.excess[keep]
        assert not torch.allclose(vals, det.distances[keep])  # the benchmark did something
        torch.testing.assert_close(torch.tensor(p.mu), vals.mean(0), rtol=1e-4, atol=1e-6)

    def test_w_lam_meta(self, setup):
        p = setup["profile"]
        assert len(p.w) == len(p.distances)
        assert sum(p.w) == pytest.approx(1.0) and min(p.w) > 0
        assert p.lam == 0.0 or 1e-5 <= p.lam <= 100
        assert p.name == "t" and p.recnet.pretrained == []
        m = p.meta
        assert m["n_clean"] == 32 and m["n_attacked"] == 8 and m["fpr_target"] == 0.1
        assert set(m["auroc_per_distance"]) == set(p.distances)
        assert 0.5 < m["auroc_train"] <= 1.0

    def test_base_profile_not_changed(self, setup):
        assert setup["base"].profile == Profile()

    def test_loads_in_guard(self, setup, face_parser, tmp_path):
        p = setup["profile"]
        p.save(tmp_path / "fitted.json")
        from_file = Guard(
            setup["G"], parser=face_parser, profile=str(tmp_path / "fitted.json"), device="cpu"
        )
        assert from_file.profile == p
        direct = Guard(setup["G"], parser=face_parser, profile=p, device="cpu")
        x, c = setup["x_adv"][:2], setup["c"][:2]
        torch.testing.assert_close(from_file.detect(x, c).score, direct.detect(x, c).score)

    def test_bad_fpr(self, setup):
        with pytest.raises(ValueError, match="fpr"):
            fit(setup["base"], setup["x_neg"], setup["c_neg"], setup["x_adv"], setup["c"], fpr=0.0)

    def test_pretrain_recnet(self, setup, face_parser):
        layers = [["median", "gaussian_blur"], ["jpeg"]]
        base = Guard(
            setup["G"], parser=face_parser, profile=Profile(recnet={"layers": layers}), device="cpu"
        )
        p = fit(base, setup["x_neg"][:8], setup["c_neg"][:8], setup["x_adv"][:4], setup["c"][:4])
        q = p.recnet.pretrained
        assert [[m["name"] for m in layer] for layer in q] == layers
        for layer in q:
            for m in layer:
                assert set(m) == {"name", "params"}
        assert len(p.meta["recnet_pretrain_scores"]) == 2
        assert Profile.from_dict(p.to_dict()) == p  # JSON-able


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--help"])
    assert e.value.code == 0
    assert "--fpr" in capsys.readouterr().out


class TestExtraNegatives:
    """``main --extra-negatives``: video face crops (``python -m daemon.face_crops``) join the
    clean negatives, with their benign copies, and are counted in ``profile.meta``."""

    @pytest.fixture
    def run_main(self, monkeypatch, face_parser, tmp_path):
        """``calibrate.main`` in a second or two: a tiny StarGAN, the layout parser, fabricated
        "CelebA" faces, one PGD attack, and ``fit`` without Rec-Net pretraining (its arguments
        are recorded)."""
        import magdr
        import magdr.celeba as data

        torch.manual_seed(0)
        G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=SIZE).eval()
        rng = np.random.default_rng(0)
        celeba = {
            "images": rng.integers(0, 256, (8000, SIZE, SIZE, 3), dtype=np.uint8),
            "attrs": rng.integers(0, 2, (8000, 5)).astype(np.float32),
        }
        real_guard, real_fit = magdr.Guard, calibrate.fit
        seen: dict = {}

        def fit_fast(guard, x_neg, c_neg, x_pos, c_pos, **kw):
            seen.update(x_neg=x_neg, c_neg=c_neg, n_pos=len(x_pos), groups=kw.get("groups"))
            return real_fit(guard, x_neg, c_neg, x_pos, c_pos, **{**kw, "pretrain_recnet": False})

        monkeypatch.setattr(magdr, "load_generator", lambda *a, **k: G)
        monkeypatch.setattr(
            magdr, "Guard", lambda G, parser=None, **k: real_guard(G, parser=face_parser, **k)
        )
        monkeypatch.setattr(data, "load_celeba", lambda root=None: celeba)
        monkeypatch.setattr(calibrate, "fit", fit_fast)

        def run(*extra: str) -> tuple[Profile, dict]:
            out = tmp_path / "p.json"
            argv = ["--n", "4", "--attacks", "pgd", "--device", "cpu", "--out", str(out)]
            assert calibrate.main(argv + list(extra)) == 0
            return Profile.load(out), dict(seen)

        return run

    def test_counted_and_added(self, run_main, tmp_path):
        rng = np.random.default_rng(1)
        a, b = tmp_path / "a.npz", tmp_path / "b.npz"
        # b at twice G's side: resized to it.
        np.savez(a, images=rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
        np.savez(b, images=rng.integers(0, 256, (2, 2 * SIZE, 2 * SIZE, 3), dtype=np.uint8),
                 sources=np.array(["clip.mp4#0", "clip.mp4#5"]))  # fmt: skip
        base, seen0 = run_main()
        assert "extra_negatives" not in base.meta
        p, seen = run_main("--extra-negatives", str(a), "--extra-negatives", str(b))
        k = 1 + len(BENIGN)
        # The extras bring their own benign copies (face_crops --benign): added as they are.
        assert p.meta["extra_negatives"] == [
            {"path": str(a), "faces": 3, "negatives": 3},
            {"path": str(b), "faces": 2, "negatives": 2},
        ]
        assert p.meta["n_clean"] == 4 * k + 5
        assert seen["x_neg"].shape == (4 * k + 5, 3, SIZE, SIZE)
        assert seen["c_neg"].shape == (4 * k + 5, 5)
        # The CelebA part is unchanged by the extras; then each file's faces.
        torch.testing.assert_close(seen["x_neg"][: 4 * k], seen0["x_neg"])
        torch.testing.assert_close(seen["c_neg"][: 4 * k], seen0["c_neg"])
        from magdr.celeba import to_tensor

        xa = to_tensor(np.load(a)["images"])
        torch.testing.assert_close(seen["x_neg"][4 * k : 4 * k + 3], xa)
        # One edit per extra face, drawn like the CelebA faces' (a one-hot change of G's five
        # attributes' condition).
        ca = seen["c_neg"][4 * k : 4 * k + 3]
        assert ((ca == 0) | (ca == 1) | (ca == 0.5)).all()

    def test_extras_take_every_edit_and_own_is_the_keep_condition(self, run_main, tmp_path):
        import magdr

        a = tmp_path / "a.npz"
        np.savez(a, images=np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8))
        p, seen = run_main("--extra-negatives", str(a), "--edits", "own,Blond_Hair=1")
        k = 1 + len(BENIGN)
        assert p.meta["n_clean"] == 2 * 4 * k + 2 * 3
        c = seen["c_neg"]
        # CelebA faces: 'own' is each face's labels, so rows differ from the keep condition.
        assert set(c[:4].flatten().tolist()) <= {0.0, 1.0}
        extra = c[2 * 4 * k :]
        keep = magdr.condition(magdr.load_generator("default"), {}, batch=3).cpu()
        torch.testing.assert_close(extra[:3], keep)
        torch.testing.assert_close(extra[3:], torch.tensor([[0, 1, 0, 0, 0]] * 3).float())
        # one false-alarm group per edit and source: CelebA 'own' (with its benign copies),
        # CelebA Blond_Hair, the extras' 'own', the extras' Blond_Hair
        g = seen["groups"]
        assert g.tolist() == ([0] * 4 + [1] * 4) * k + [2] * 3 + [3] * 3

    def test_attack_extra_adds_positives(self, run_main, tmp_path):
        a = tmp_path / "a.npz"
        np.savez(a, images=np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8))
        _, seen0 = run_main("--extra-negatives", str(a))
        p, seen = run_main("--extra-negatives", str(a), "--attack-extra", "2")
        # the negatives do not change; up to 2 more faces were attacked (successful ones kept)
        torch.testing.assert_close(seen["x_neg"], seen0["x_neg"])
        assert seen0["n_pos"] <= seen["n_pos"] <= seen0["n_pos"] + 2

    def test_clean_margin_option(self, run_main):
        mid, _ = run_main()
        p, _ = run_main("--clean-margin", "1.001")  # this tiny G's gap is narrow (0.2062–0.2071)
        assert p.meta["clean_margin"] == 1.001 and mid.meta["clean_margin"] == 0.0
        assert mid.meta["threshold_rule"] == "gap-midpoint"
        assert p.meta["threshold_rule"] == "gap-margin"
        assert p.threshold == pytest.approx(1.001 * p.meta["clean_max"])
        assert p.meta["clean_max"] < p.threshold < mid.threshold < p.meta["attacked_min"]

    def test_distances_option(self, run_main, capsys):
        p, _ = run_main("--distances", "l1,l2")
        assert p.distances == ["l1", "l2"] and len(p.mu) == len(p.sigma) == len(p.w) == 2
        with pytest.raises(SystemExit) as e:
            run_main("--distances", "l1,psnr")
        assert e.value.code == 2 and "--distances" in capsys.readouterr().err

    def test_consistency_option(self, run_main, capsys):
        p, _ = run_main("--consistency", "median:k=3")
        assert p.consistency == [{"name": "median", "params": {"k": 3}}]
        with pytest.raises(SystemExit) as e:
            run_main("--consistency", "sharpen:k=3")
        assert e.value.code == 2 and "--consistency" in capsys.readouterr().err

    def test_bad_file_is_a_usage_error(self, run_main, tmp_path, capsys):
        bad = tmp_path / "bad.npz"
        np.savez(bad, images=np.zeros((2, SIZE, SIZE), np.float32))
        for path in (bad, tmp_path / "missing.npz"):
            with pytest.raises(SystemExit) as e:
                run_main("--extra-negatives", str(path))
            assert e.value.code == 2
            assert "--extra-negatives" in capsys.readouterr().err

    def test_fixed_edits_repeat_every_face_once_per_entry(self, run_main):
        _, seen0 = run_main()
        p, seen = run_main("--edits", "random,Blond_Hair=1,Male=1+Young=0")
        k = 1 + len(BENIGN)
        assert p.meta["edits"] == "random,Blond_Hair=1,Male=1+Young=0"
        assert p.meta["n_clean"] == 3 * 4 * k
        c = seen["c_neg"][: 3 * 4]  # the faces themselves (benign copies follow)
        torch.testing.assert_close(c[:4], seen0["c_neg"][:4])  # 'random' as before
        torch.testing.assert_close(c[4:8], torch.tensor([[0, 1, 0, 0, 0]] * 4).float())
        torch.testing.assert_close(c[8:12], torch.tensor([[0, 0, 0, 1, 0]] * 4).float())
        torch.testing.assert_close(seen["x_neg"][:4], seen["x_neg"][4:8])

    def test_bad_edits_are_a_usage_error(self, run_main, capsys):
        with pytest.raises(SystemExit) as e:
            run_main("--edits", "Blond_Hair")
        assert e.value.code == 2 and "--edits" in capsys.readouterr().err

    def test_reference_option(self, run_main, capsys):
        p, _ = run_main()
        assert p.reference == {"name": "median", "params": {"k": 3}}  # the default
        p, _ = run_main("--reference", "gaussian_blur:sigma=0.8")
        assert p.reference == {"name": "gaussian_blur", "params": {"sigma": 0.8}}
        assert run_main("--reference", "none")[0].reference is None
        with pytest.raises(SystemExit) as e:
            run_main("--reference", "sharpen:k=3")
        assert e.value.code == 2 and "--reference" in capsys.readouterr().err


def test_parse_transform():
    assert calibrate.parse_transform("median:k=3") == {"name": "median", "params": {"k": 3}}
    assert calibrate.parse_transform(" jpeg ") == {"name": "jpeg", "params": {}}
    assert calibrate.parse_transform("NONE") is None
    with pytest.raises(ValueError, match="NAME"):
        calibrate.parse_transform("median:3")


def test_parse_edits():
    assert calibrate.parse_edits("random, Blond_Hair=1 ,Male=1+Young=0") == [
        "random", {"Blond_Hair": 1.0}, {"Male": 1.0, "Young": 0.0},
    ]  # fmt: skip
    for bad in ("", "Blond_Hair", "=1", "random,,"):
        with pytest.raises(ValueError):
            calibrate.parse_edits(bad)


def test_threshold_holds_the_rate_in_every_group():
    # group 0: 100 low clean scores; group 1: 10 clean scores, two of them high
    neg = torch.cat([torch.linspace(0, 0.4, 100), torch.tensor([0.1] * 8 + [0.7, 0.8])])
    groups = torch.tensor([0] * 100 + [1] * 10)
    pos = torch.linspace(0.75, 1.0, 20)
    pooled, _ = choose_threshold(neg, pos, fpr=0.05)
    assert pooled < 0.8  # 1 of 110 pooled: allowed, though group 1 then flags 10%
    t, _ = choose_threshold(neg, pos, fpr=0.05, groups=groups)
    assert t >= 0.8  # no more than 5% of group 1 either: both of its high scores pass
    assert ((neg[groups == 1] > t).float().mean()) <= 0.05
