"""The benchmark: metric helpers, baselines, the adaptive attack's snapshots, and a quick run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import baselines as B
from bench.common import at_threshold, fpr_at_tpr, roc_curve

ROOT = Path(__file__).resolve().parents[2]


class TestMetrics:
    def test_at_threshold_hand_computed(self):
        neg = np.array([0.1, 0.2, 0.6, 0.3])
        pos = np.array([0.7, 0.4, 0.9])
        r = at_threshold(neg, pos, 0.5)  # tp 2, fp 1, fn 1
        assert r["precision"] == pytest.approx(2 / 3)
        assert r["recall"] == pytest.approx(2 / 3)
        assert r["f1"] == pytest.approx(2 / 3)
        assert r["fpr"] == pytest.approx(0.25)

    def test_no_positives_is_nan_not_zero(self):
        r = at_threshold(np.array([0.1]), np.array([]), 0.5)
        assert math.isnan(r["recall"]) and math.isnan(r["f1"])

    def test_fpr_at_tpr(self):
        neg = np.arange(100) / 100.0
        pos = np.full(20, 0.955)
        assert fpr_at_tpr(neg, pos) == pytest.approx(0.04)
        assert fpr_at_tpr(np.array([0.0]), np.array([1.0])) == 0.0

    def test_roc_curve_ends(self):
        fpr, tpr = roc_curve(np.array([0.1, 0.4]), np.array([0.3, 0.8]))
        assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


class TestBaselines:
    def test_median2_takes_rank_two_of_the_window(self):
        x = torch.tensor([[1.0, 4.0], [3.0, 2.0]]).view(1, 1, 2, 2)
        # top-left window {1,4,3,2} sorted 1,2,3,4 -> rank 2 = 3 (scipy's median_filter(size=2))
        assert B.median2(x)[0, 0, 0, 0] == 3.0

    def test_haar_round_trip(self):
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(B._ihaar(*B._haar(x)), x, atol=1e-6)

    def test_wavelet_denoise_reduces_noise(self):
        g = torch.Generator().manual_seed(0)
        clean = torch.linspace(-0.5, 0.5, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
        den = B.wavelet_denoise(noisy)
        assert (den - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()

    def test_pixel_deflection_and_resize_pad(self):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        for f in (B.pixel_deflection, B.random_resize_pad):
            y = f(x, torch.Generator().manual_seed(0))
            assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
            assert not torch.equal(y, x)
        y = B.random_resize_pad(torch.ones(1, 3, 40, 40), torch.Generator().manual_seed(3))
        assert (y == -1).any()  # the black padding Xie et al. add

    def test_feature_squeezing_is_differentiable_and_zero_on_flat_input(self):
        from magdr.models.stargan import StarGAN

        torch.manual_seed(0)
        G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=16).eval()
        fs = B.FeatureSqueezing(G)
        c = torch.zeros(2, 5)
        # A flat image on the 5-bit grid: every squeezer leaves it unchanged.
        flat = torch.full((2, 3, 16, 16), 2 * 16 / 31 - 1)
        assert torch.allclose(fs.score(flat, c), torch.zeros(2), atol=1e-6)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():  # G(x) given by the caller gives the same score
            assert torch.allclose(fs.score(x, c), fs.score(x, c, G(x, c)), atol=1e-6)
        x.requires_grad_(True)
        fs.score(x, c).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    def test_thresholds_give_the_asked_fpr(self):
        neg = np.arange(1000) / 1000.0
        thr = B.fpr_threshold(neg, 0.05)
        assert (neg > thr).mean() == pytest.approx(0.05, abs=0.002)


def test_snapshots_equal_shorter_adaptive_runs():
    """The k-th snapshot of one long adaptive run is magdr.attacks.adaptive_pgd with k steps."""
    from bench.adaptive import SnapshotAdaptivePGD
    from magdr.attacks import adaptive_pgd
    from magdr.models.stargan import StarGAN

    torch.manual_seed(0)
    G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=16).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = torch.zeros(2, 5)
    pool = [
        {"name": "gaussian_blur", "params": {"sigma": 0.8}},
        {"name": "jpeg", "params": {"quality": 75}},
    ]
    attack = SnapshotAdaptivePGD(G, transforms=pool, snapshots=[1, 3], eot_samples=2)
    attack(x, c, generator=torch.Generator().manual_seed(5))
    for k in (1, 3):
        ref = adaptive_pgd(
            G,
            x,
            c,
            transforms=pool,
            steps=k,
            eot_samples=2,
            generator=torch.Generator().manual_seed(5),
        )
        assert torch.allclose(attack.saved[k], ref, atol=1e-6), k


@pytest.mark.slow
# On CUDA the whole run crossed devices once unnoticed (the AE reformer got CPU faces).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quick_run_writes_report(tiny_models, tmp_path, device):
    pytest.importorskip("matplotlib")
    from magdr.purifier import Purifier, save_purifier

    G, P = tiny_models
    out = tmp_path / "results"
    purifier = tmp_path / "purifier.pt"
    save_purifier(Purifier(width=4), purifier)  # the identity: every row and column is made
    out.mkdir()
    # a section another command wrote (python -m bench.soak --report) survives the rewrite
    soak = "## Soak\n\n- Result: **passed**.\n"
    (out / "REPORT.md").write_text("# stale report\n\n## Table 1\n\nstale row\n\n" + soak)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--generator",
        str(G),
        "--parser",
        str(P),
        "--purifier",
        str(purifier),
        "--data",
        "synthetic",
        "--out",
        str(out),
        "--device",
        device,
        "--success-mse",
        "0.002",
        "--eps",
        "0.06",
        "--step",
        "0.012",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    for png in ("roc.png", "fig3_adaptive.png", "fig1_magdr.png", "fig4_defences.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in report
    assert "**not** Ruiz et al.'s ε 0.05" in report and "For comparison, PGD at Ruiz" in report
    for heading in ("Table 1", "Table 2", "Figure 3", "Throughput"):
        assert heading in report
    assert report.endswith("\n\n" + soak) and "stale" not in report
    # Tables hold numbers: every detector's PGD row has a numeric AUROC, Table 2 has PSNRs.
    for det in ("MagDR (DD+CD)", "Feature squeezing", "MagNet AE", "OTD"):
        assert re.search(rf"\| {re.escape(det)} \| \d\.\d\d / ", report), det
    assert re.search(r"\| JPEG q75 \(Dziugaite\) \| [\d.]+ \| [\d.]+ \| [\d.]+", report)
    # Table 2: a summary row and a table per attack (the held-out radius too), the paper's
    # Rec-Net beside the shipped guard on PGD, and the clean faces.
    for attack in ("PGD", "I-FGSM", "C&W-L2", "Targeted", "PGD ε 0.08"):
        assert re.search(rf"^\| {re.escape(attack)} \| \d+ \| [\d.]+ \|", report, re.M), attack
        assert f"### {attack}: " in report
    for row in ("MagDR (purifier + Rec-Net)", "MagDR, Rec-Net only (paper)",
                "Purifier alone (every face)"):  # fmt: skip
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ \|", report, re.M), row
    assert "### Clean faces" in report
    res = json.loads((out / "results.json").read_text())
    assert res["commit"] and res["wall_s"] > 0
    assert res["machine"]["device"].startswith(device)
    tp = res["throughput"]
    assert tp["plain G"]["ratio"] == pytest.approx(1.0)
    assert 0 < tp["guard, clean input"]["ratio"] < 1.5
    assert set(res["adaptive"]["curves"]) >= {"MagDR (DD+CD)", "OTD"}
    assert (out / "cache").is_dir()  # trained baselines are cached


def test_adaptive_detectors_are_chosen_by_name_prefix():
    from bench.adaptive import selected
    from bench.common import MAGDR

    assert selected(MAGDR, None) and selected("OTD", [])
    assert selected(MAGDR, ["magdr"]) and selected("MagNet AE", ["otd", " magnet"])
    assert not selected("MagNet AE", ["magdr"]) and not selected("OTD", ["magdr", "feature"])


def test_put_section_replaces_or_appends_one_section(tmp_path):
    from bench.report import put_section, section

    path = tmp_path / "REPORT.md"
    path.write_text("# R\n\n## A\n\na\n\n## Soak\n\nold\n\n## B\n\nb\n")
    put_section(path, "## Soak", "## Soak\n\nnew")
    assert path.read_text() == "# R\n\n## A\n\na\n\n## Soak\n\nnew\n\n## B\n\nb\n"
    assert section(path.read_text(), "## B") == "## B\n\nb\n"
    assert section(path.read_text(), "## C") == ""
    put_section(path, "## C", "## C\n\nc\n")
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")


def _data_available() -> bool:
    from magdr.celeba import data_root

    try:
        data_root()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.data
@pytest.mark.skipif(not _data_available(), reason="face data (MAGDR_DATA) not present")
def test_val_faces_are_the_held_out_split():
    from bench.data import load_faces
    from magdr.models.stargan import StarGAN

    G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=64)
    G.attributes = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]
    G.neutral = [0.0, 0.0, 0.0, 0.0, 1.0]
    val = load_faces(G, "val", 4)
    assert val.ids == ["008001", "008002", "008003", "008004"]
    assert val.x.shape == (4, 3, 64, 64) and val.x.min() >= -1 and val.x.max() <= 1
    assert val.task == ["hair", "face", "hair", "face"]
    train = load_faces(G, "train", 6, seed=1)
    assert all(int(i) <= 8000 for i in train.ids)
    # A hair edit asks for a hair colour the face does not have.
    from magdr.celeba import load_celeba

    attrs = load_celeba()["attrs"][8000]
    j = int(val.c[0, :3].argmax())
    assert attrs[j] < 0.5


def test_conditions_per_generator_kind():
    from bench.data import conditions
    from magdr.models.cyclegan import CycleGAN
    from magdr.models.ganimation import GANimation
    from magdr.models.stargan import StarGAN

    rng = np.random.default_rng(0)
    attrs = np.zeros((4, 5), np.float32)
    c, tasks = conditions(CycleGAN(ngf=4, n_blocks=1, image_size=16), attrs, rng)
    assert c is None and tasks == ["replace"] * 4
    c, tasks = conditions(GANimation(conv_dim=4, repeat_num=1, image_size=16), attrs, rng)
    assert c.shape == (4, 17) and 0 <= c.min() and c.max() <= 1 and tasks == ["reenact"] * 4
    G = StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=16)
    G.attributes = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]
    G.neutral = [0.0, 0.0, 0.0, 0.0, 1.0]
    c, tasks = conditions(G, attrs, rng)
    assert tasks == ["hair", "face", "hair", "face"]
    assert (c[0, :3].sum(), c[2, :3].sum()) == (1.0, 1.0)  # one hair colour asked for


def test_detection_on_an_unconditional_generator(tiny_models):
    """Table 1 runs for a CycleGAN-like G (no condition; targeted attack aims at the input)."""
    import magdr
    from bench.common import Bench
    from bench.data import Faces, synthetic_images
    from bench.detection import attack_suite, run
    from magdr.models.cyclegan import CycleGAN

    torch.manual_seed(0)
    G = CycleGAN(ngf=4, n_blocks=1, image_size=16).eval()
    _, parser = tiny_models
    guard = magdr.Guard(G, parser=str(parser), device="cpu")
    bench = Bench(G=G, guard=guard, device=torch.device("cpu"), batch=4, success_mse=1e-4)
    bench.thresholds = {n: 0.0 for n in bench.names}
    val = Faces(synthetic_images(3, 16, 0), None, ["replace"] * 3, ["a", "b", "c"])
    suite = {k: v for k, v in attack_suite(steps=2).items() if k in ("PGD", "Targeted")}
    res, attacked = run(bench, val, suite)
    assert res["groups"] == ["all"] and res["group_labels"] == {"all": "replace"}
    assert res["n_neg"] == 12  # 3 clean faces + 3 benign copies of each
    assert set(res["rows"]) == {"PGD", "Targeted"}
    assert attacked["PGD"].x_adv.shape == val.x.shape


def test_scaling_reports_the_median_run():
    from bench.scaling import median_run

    r = median_run([{"fps": 5.0, "n": 0}, {"fps": 2.0, "n": 1}, {"fps": 3.0, "n": 2}])
    assert r["n"] == 2 and r["fps_all"] == [5.0, 2.0, 3.0]


def test_scaling_section_goes_at_the_end_of_throughput_once(tmp_path):
    from bench.scaling import section, write_section

    data = {
        "command": "python -m bench.scaling",
        "commit": "abc",
        "device": "cpu",
        "threads": 1,
        "frames": 200,
        "machine": {"cpu_count": 2, "load_avg": [1.0, 1, 1]},
        "runs": [
            {"backend": "local", "replicas": None, "workers": 0, "fps": 3.0},
            {"backend": "ray", "replicas": 1, "workers": 1, "fps": 2.0},
            {"backend": "ray", "replicas": 2, "workers": 2, "fps": 3.0},
        ],
    }
    report = tmp_path / "REPORT.md"
    report.write_text("# R\n\n## Throughput\n\ntable\n\n## Figures\n\npng\n")
    write_section(report, section(data))
    write_section(report, section(data))  # a second run replaces the first
    text = report.read_text()
    assert text.count("### Scale-out") == 1
    assert text.index("table") < text.index("### Scale-out") < text.index("## Figures")
    assert "| ray | 2 | 2 | 3.00 | 3.00 | 1.50 |" in text
    assert "| local | - | - | 3.00 | 3.00 |  |" in text
    assert "not measured in this run (no GPU)" in text
