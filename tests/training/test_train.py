from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from magdr.faces.parsenet import ParseNet
from magdr.faces.regions import BISENET_CLASSES
from training import data as D
from training.common import Budget

WEIGHTS = Path(__file__).resolve().parents[2] / "magdr/models/weights"


def _has_data() -> bool:
    try:
        D.data_root()
    except FileNotFoundError:
        return False
    return True


# --- smoke runs of the three training scripts (fabricated data, temp dirs) -------------------


def test_parser_smoke(tmp_path: Path) -> None:
    from training import parser

    table = parser.main(["--smoke", "--threads", "1"])
    assert set(table) == {*parser.EVAL_GROUPS, "mIoU"}


def test_parser_distillation_smoke(tmp_path: Path) -> None:
    from training import parser

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(ParseNet(width=6, depth=3).state_dict(), teacher)
    run = tmp_path / "run"
    argv = ["--smoke", "--threads", "1", "--teacher", str(teacher), "--label-weight", "0",
            "--run-dir", str(run)]  # fmt: skip
    parser.main(argv)
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert rows and all(r["teacher"] > 0 for r in rows)
    assert ParseNet.from_state_dict(torch.load(run / "parser.pt", weights_only=True)).width == 4


@pytest.mark.parametrize("which", ["eval", "hair"])
def test_classifier_smoke(which: str) -> None:
    from training import classifier

    acc = classifier.main(["--smoke", "--threads", "1", "--which", which])
    assert acc.shape == (5,) and ((acc >= 0) & (acc <= 1)).all()


def test_hair_only_input_keeps_the_hair_and_greys_the_rest() -> None:
    from training.shared import hair_only

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    hair = torch.zeros(1, 1, 8, 8)
    hair[..., :3, :] = 0.9
    hair[..., 3, :] = 0.4  # below one half: not hair
    y = hair_only(x, hair)
    torch.testing.assert_close(y[..., :3, :], x[..., :3, :])
    assert (y[..., 3:, :] == 0).all()


def test_stargan_smoke_runs_both_stages_and_writes_registry_metadata() -> None:
    from magdr.models.stargan import StarGAN
    from training import stargan

    out = stargan.main(["--smoke", "--threads", "1"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kind"] == "stargan" and meta["neutral"] == [0, 0, 0, 0.5, 0.5]
    sd = torch.load(out, weights_only=True)
    G = StarGAN.from_state_dict(sd, image_size=meta["image_size"])
    assert G.conv_dim == meta["conv_dim"] and G.repeat_num == meta["repeat_num"]
    assert torch.load(out.parent / "ckpt.pt", weights_only=False)["step"] == 2


def test_stargan_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    from training import stargan

    run = tmp_path / "run"
    stargan.main(["--smoke", "--threads", "1", "--steps", "1", "--run-dir", str(run)])
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 1
    stargan.main(["--smoke", "--threads", "1", "--steps", "2", "--run-dir", str(run), "--resume"])
    steps = [json.loads(ln)["step"] for ln in (run / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the second run started at step 1, not from scratch
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 2


class _RunsOutAfter3(Budget):
    """A ``--max-minutes`` budget that runs out after exactly 3 steps (a clock would be flaky)."""

    def done(self, step: int) -> bool:  # noqa: D102
        return step >= 3 or super().done(step)


@pytest.mark.parametrize("script", ["stargan", "parser"])
def test_a_run_stopped_by_its_budget_keeps_its_last_state_and_resumes(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module(f"training.{script}")
    run = tmp_path / "run"
    args = ["--smoke", "--threads", "1", "--steps", "6", "--ckpt-every", "1000",
            "--run-dir", str(run)]  # fmt: skip
    monkeypatch.setattr(module, "Budget", _RunsOutAfter3)
    module.main(args)
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 3  # not a multiple of 1000
    monkeypatch.setattr(module, "Budget", Budget)
    module.main([*args, "--resume"])
    steps = [json.loads(ln)["step"] for ln in (run / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 6


def test_stargan_ae_only_smoke_needs_no_hair_maps(tmp_path: Path) -> None:
    from training import stargan

    out = stargan.main(["--smoke", "--threads", "1", "--ae-only", "--run-dir", str(tmp_path)])
    assert out.exists()


def test_stargan_distillation_smoke_loads_its_teacher(tmp_path: Path) -> None:
    from training import stargan

    teacher = stargan.main(["--smoke", "--threads", "1", "--run-dir", str(tmp_path / "t")])
    args = ["--teacher", str(teacher), "--stage1-steps", "2", "--flip-prob", "1"]
    out = stargan.main(["--smoke", "--threads", "1", "--run-dir", str(tmp_path / "s"), *args])
    assert "distils Male/Young flips" in (tmp_path / "s/train.log").read_text()
    assert out.exists()


def test_stargan_smoke_with_a_hair_only_teacher(tmp_path: Path) -> None:
    from training import stargan
    from training.shared import AttrNet

    torch.save(AttrNet(width=4).state_dict(), tmp_path / "aux_hair.pt")
    stargan.main(["--smoke", "--threads", "1", "--run-dir", str(tmp_path / "run"),
                  "--aux-hair", str(tmp_path / "aux_hair.pt")])  # fmt: skip
    log = (tmp_path / "run/train.log").read_text()
    assert "taught by the hair-only classifier" in log
    assert '"g_aux"' in (tmp_path / "run/losses.jsonl").read_text()  # stage 2 ran with it


def test_colour_shift_sees_a_tint_outside_the_edit_and_ignores_the_edit() -> None:
    from training.stargan import colour_shift

    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    w = torch.ones(2, 1, 8, 8)
    w[:, :, :4] = 0  # the edited region
    fake = x.clone()
    fake[:, :, :4] += 0.7  # the edit itself: not a tint
    fake[1, 0, 4:] += 0.1  # image 1: red tint outside the edit
    shift = colour_shift(fake, x, w)
    torch.testing.assert_close(shift, torch.tensor([[0.0, 0, 0], [0.1, 0, 0]]))


def test_distillation_target_is_the_teachers_face_edit_with_the_hair_recoloured() -> None:
    from magdr.models.stargan import StarGAN
    from training.stargan import distillation_target, recolour_hair

    torch.manual_seed(0)
    teacher = StarGAN(conv_dim=4, repeat_num=1).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    c = torch.tensor([[1.0, 0, 0, 1, 0.5], [0, 1, 0, 0.5, 0.5], [0, 0, 0, 0.5, 0.5]])
    hair = torch.zeros(3, 1, 16, 16)
    hair[:, :, :5] = 1
    k = torch.tensor([0, 1, 0])
    rec = torch.tensor([1.0, 1, 0])[:, None, None, None]
    fl = torch.tensor([1.0, 0, 0])[:, None, None, None]
    mus, sds = torch.rand(3, 3) * 0.5, torch.full((3, 3), 0.05)
    y = distillation_target(teacher, x, c, hair, k, rec, fl, mus, sds)
    # face 0: Male flipped and black hair asked -> the teacher's edit (hair kept), recoloured
    t0 = teacher(x[:1], torch.tensor([[0.0, 0, 0, 1, 0.5]]))
    torch.testing.assert_close(y[:1], recolour_hair(t0, hair[:1], k[:1], mus, sds))
    # face 1: only the hair recoloured, the rest is x; face 2: nothing asked -> x
    torch.testing.assert_close(y[1:2, :, 5:], x[1:2, :, 5:])
    assert (y[1:2, :, :5] - x[1:2, :, :5]).abs().mean() > 0.05
    torch.testing.assert_close(y[2], x[2])
    # --teacher-edits all: a hair request starts from the teacher's whole edit
    y_all = distillation_target(teacher, x, c, hair, k, rec, fl, mus, sds, hair_edits=True)
    t_all = recolour_hair(teacher(x[:2], c[:2]), hair[:2], k[:2], mus, sds)
    torch.testing.assert_close(y_all[:2], t_all)
    torch.testing.assert_close(y_all[2], x[2])


def test_stargan_stage1_distillation_of_every_edit_with_a_tint_penalty(tmp_path: Path) -> None:
    from training import stargan

    teacher = stargan.main(["--smoke", "--threads", "1", "--run-dir", str(tmp_path / "t")])
    args = ["--teacher", str(teacher), "--teacher-edits", "all", "--lambda-tint", "5",
            "--stage1-steps", "2"]  # fmt: skip
    stargan.main(["--smoke", "--threads", "1", "--run-dir", str(tmp_path / "s"), *args])
    assert '"tint"' in (tmp_path / "s/losses.jsonl").read_text()


class TopHalfHair(torch.nn.Module):
    """A "parser" that puts hair in the top rows and background everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from training.evaluate import HAIR

        logits = torch.zeros(x.shape[0], len(BISENET_CLASSES), *x.shape[2:])
        logits[:, HAIR, : x.shape[2] // 2] = 20.0
        return logits


def test_recolour_reference_edits_only_the_parsed_hair() -> None:
    from training.evaluate import RecolourReference

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = RecolourReference(TopHalfHair(), torch.rand(3, 3) * 0.5, torch.full((3, 3), 0.05))
    y = ref(x, torch.tensor([[0.0, 1, 0, 0.5, 0.5], [0, 0, 0, 1, 0.5]]))
    torch.testing.assert_close(y[0, :, 8:], x[0, :, 8:])
    assert (y[0, :, :8] - x[0, :, :8]).abs().mean() > 0.05
    torch.testing.assert_close(y[1], x[1])  # a Male request: unchanged
    assert ref.target_regions(torch.tensor([[0.0, 1, 0, 0.5, 0.5]])).sum() > 0

    class Darkens(torch.nn.Module):  # a "generator" whose every edit darkens the whole image
        def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return x - 0.2

    on_g = RecolourReference(TopHalfHair(), ref.mus, ref.sds, base=Darkens())
    y_on = on_g(x, torch.tensor([[0.0, 1, 0, 0.5, 0.5], [0, 0, 0, 1, 0.5]]))
    torch.testing.assert_close(y_on[0, :, 8:], x[0, :, 8:] - 0.2)  # the base's edit outside
    torch.testing.assert_close(y_on[0, :, :8], y[0, :, :8])  # the same hair colour on top
    torch.testing.assert_close(y_on[1], x[1] - 0.2)  # a Male request: the base's edit alone


def test_shrink_takes_exact_block_means_in_either_layout() -> None:
    a = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    small = D.shrink(a, 2)
    assert small.shape == (2, 2, 2, 3)
    assert small[0, 0, 0, 0] == np.round(a[0, :2, :2, 0].mean())
    np.testing.assert_array_equal(D.shrink(a.transpose(0, 3, 1, 2), 2, False),
                                  small.transpose(0, 3, 1, 2))  # fmt: skip
    assert D.shrink(a, 4) is a
    with pytest.raises(ValueError, match="multiple"):
        D.shrink(a, 3)


def test_region_cache_tells_apart_two_face_sets_of_the_same_size(tmp_path, monkeypatch) -> None:
    from training.shared import cached_region_probs

    monkeypatch.setenv("MAGDR_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    parser_path = tmp_path / "parser.pt"
    parser = ParseNet(width=4, depth=2)
    with torch.no_grad():  # sharper logits, so that different faces get different maps
        for q in parser.parameters():
            q.mul_(5)
    torch.save(parser.state_dict(), parser_path)
    a, b = D.fake_faces(2, 32, seed=0)["images"], D.fake_faces(2, 32, seed=1)["images"]
    maps_a, maps_b = cached_region_probs(parser_path, a), cached_region_probs(parser_path, b)
    assert not np.array_equal(maps_a, maps_b)
    assert len(list((tmp_path / "cache").glob("regions_*.npy"))) == 2
    np.testing.assert_array_equal(cached_region_probs(parser_path, a), maps_a)  # a cache hit


def test_a_half_size_generator_is_measured_at_its_own_size(monkeypatch) -> None:
    """Issue 3's 64×64 fallback: faces and parser maps shrunk to G's side, classifiers at 128."""
    from magdr.models.stargan import StarGAN
    from training.evaluate import eval_generator
    from training.shared import AttrNet

    class BrightensTheTopHalf(StarGAN):  # a 16×16 "editor" that changes only the top rows
        def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            assert x.shape[-1] == 16
            y = x.clone()
            y[:, :, :8] = (y[:, :, :8] + 0.5).clamp(max=1)
            return y

    monkeypatch.setattr(D, "CELEBA_TRAIN", range(0))  # validation faces from index 0
    cel = D.fake_faces(4, 32)
    G = BrightensTheTopHalf(conv_dim=4, repeat_num=1, image_size=16)
    res = eval_generator(G, TopHalfHair(), AttrNet(width=4).eval(), cel, 4, batch=2)
    blond = res["Blond_Hair"]
    assert blond["hair_diff"] > 0.1 and blond["outside_hair_diff"] == 0  # masks line up at 16
    assert blond["psnr_non_target_mean"] > 60  # nothing outside the hair moved
    assert "recognised_all" in res["Male"]  # the 128-side classifier saw the upsampled output


def test_budget_fraction_follows_steps_or_time() -> None:
    b = Budget(100)
    assert b.fraction(25) == 0.25 and not b.done(99) and b.done(100)
    t = Budget(100, max_minutes=0.0)  # no time at all: done before the first step
    assert t.fraction(0) == 1.0 and t.done(0)


def test_one_cycle_matches_torch_one_cycle_shape() -> None:
    from training.parser import one_cycle

    net = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=201, pct_start=0.05)
    ours, theirs = [], []
    for i in range(201):
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(one_cycle(1e-3, i / 200))
        opt.step()
        sched.step()
    assert ours[0] == pytest.approx(1e-3 / 25) and max(ours) == pytest.approx(1e-3)
    assert ours[-1] == pytest.approx(1e-3 / 25 / 1e4)
    # Same curve up to torch's one-step offset of the warm-up's end.
    assert np.abs(np.array(ours) - np.array(theirs)).max() < 0.1 * 1e-3


def test_stage2_decay_holds_then_falls_to_a_tenth() -> None:
    from training.stargan import decay

    assert decay(0.0) == decay(0.59) == 1.0
    assert decay(0.8) == pytest.approx(0.55) and decay(1.0) == pytest.approx(0.1)


# --- pieces ------------------------------------------------------------------------------


def test_parsenet_from_state_dict_infers_widths() -> None:
    torch.manual_seed(0)
    net = ParseNet(width=4, depth=3).eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    back = ParseNet.from_state_dict(sd).eval()
    assert (back.width, back.depth, back.num_classes) == (4, 3, 19)
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    torch.testing.assert_close(back(x), net(x))
    assert back(x).shape == (1, 19, 24, 40)


def test_fs_mapping_is_one_table_into_bisenet_order() -> None:
    assert D.FS_TO_BISENET[13] == BISENET_CLASSES.index("hair")
    assert D.FS_TO_BISENET[12] == BISENET_CLASSES.index("neck")
    assert D.FS_TO_BISENET[10] == BISENET_CLASSES.index("u_lip")
    assert D.FS_TO_BISENET[255] == D.IGNORE
    # A horizontal flip swaps the sides and nothing else.
    assert D.FLIP_CLASSES[BISENET_CLASSES.index("l_eye")] == BISENET_CLASSES.index("r_eye")
    assert D.FLIP_CLASSES[BISENET_CLASSES.index("hair")] == BISENET_CLASSES.index("hair")


def test_landmark_labels_draw_parts_inside_the_face() -> None:
    pts = D.fake_faces(1)["landmarks"][0]
    rng = np.random.default_rng(0)
    # A plausible face: jaw on an arc, parts in the middle.
    t = np.linspace(np.pi * 0.05, np.pi * 0.95, 17)
    pts[:17] = np.stack([64 - 40 * np.cos(t), 60 + 45 * np.sin(t)], 1)
    pts[17:27] = np.stack([np.linspace(35, 93, 10), np.full(10, 50.0)], 1)
    pts[27:36] = np.stack([64 + rng.uniform(-6, 6, 9), np.linspace(55, 85, 9)], 1)
    eye = np.array([[-6, 0], [-3, -3], [3, -3], [6, 0], [3, 3], [-3, 3]], np.float32)
    pts[36:42], pts[42:48] = eye + [48, 62], eye + [80, 62]
    ang = np.linspace(np.pi, -np.pi, 12, endpoint=False)
    pts[48:60] = np.stack([64 + 14 * np.cos(ang), 98 + 6 * np.sin(ang)], 1)
    pts[60:68] = np.stack([64 + 8 * np.cos(ang[::3].repeat(2)[:8]), np.full(8, 98.0)], 1)
    lab = D.landmark_labels(pts)
    present = set(np.unique(lab).tolist())
    for c in ("skin", "l_eye", "r_eye", "l_brow", "r_brow", "nose", "u_lip", "l_lip"):
        assert BISENET_CLASSES.index(c) in present, c
    assert lab[0, 0] == D.IGNORE and lab[62, 48] == BISENET_CLASSES.index("l_eye")


def test_iou_table_perfect_and_wrong() -> None:
    from training.parser import iou_table

    gt = np.random.default_rng(0).integers(0, 19, (2, 16, 16)).astype(np.uint8)
    assert iou_table(gt, gt)["mIoU"] == pytest.approx(1.0)
    assert iou_table((gt + 1) % 19, gt)["mIoU"] < 0.2


def test_recolour_hair_changes_only_the_hair_and_reaches_target_mean() -> None:
    from training.stargan import _masked_stats, recolour_hair, to_ycc

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, :6] = 1
    mus = torch.tensor([[0.1, 0.0, 0.0], [0.7, -0.05, 0.05], [0.35, -0.02, 0.04]])
    sds = torch.full((3, 3), 0.05)
    y = recolour_hair(x, m, torch.tensor([1, 0]), mus, sds)
    torch.testing.assert_close(y[:, :, 6:], x[:, :, 6:])
    mu, _ = _masked_stats(to_ycc(y), m)
    assert abs(mu[0, 0].item() - 0.7) < 0.05 and abs(mu[1, 0].item() - 0.1) < 0.05


def test_sample_conditions_keep_and_flip_semantics() -> None:
    from training.stargan import sample_conditions

    rng = np.random.default_rng(0)
    real = np.tile(np.array([[1, 0, 0, 1, 0]], np.float32), (400, 1))
    c, t, k, flipped = sample_conditions(real, rng, flip_prob=0.0)
    assert not flipped.any() and set(np.unique(c[:, 3]).tolist()) <= {0.5, 1.0}
    assert (k[c[:, 0] == 1] == -1).all()  # asking black hair of a black-haired face: keep
    assert (t[:, 3:] == real[:, 3:]).all()
    c, t, k, flipped = sample_conditions(real, rng, flip_prob=0.5)
    assert flipped.any() and (t[flipped, 3:] != real[flipped, 3:]).any(1).all()


# --- shipped weights ---------------------------------------------------------------------


def test_shipped_weights_are_small_plain_tensors() -> None:
    files = [WEIGHTS / n for n in ("parser.pt", "default_G.pt") if (WEIGHTS / n).exists()]
    if not files:
        pytest.skip("no shipped weights yet")
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    for f in files:
        sd = torch.load(f, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
    if (WEIGHTS / "parser.pt").exists():
        net = ParseNet.from_state_dict(torch.load(WEIGHTS / "parser.pt", weights_only=True))
        assert net(torch.zeros(1, 3, 128, 128)).shape == (1, 19, 128, 128)


@pytest.mark.data
@pytest.mark.skipif(not _has_data() or os.environ.get("MAGDR_SKIP_DATA") == "1", reason="no data")
def test_shipped_parser_finds_faces_and_hair_on_real_celeba() -> None:
    if not (WEIGHTS / "parser.pt").exists():
        pytest.skip("no shipped parser yet")
    import cv2

    from magdr.celeba import _celeba_crop

    root = D.data_root()
    imgs = []
    for i in range(8001, 8009):
        img = cv2.imread(str(root / f"celeba/images/{i:06d}.jpg"))[:, :, ::-1]
        imgs.append(_celeba_crop(img)[0])
    net = ParseNet.from_state_dict(torch.load(WEIGHTS / "parser.pt", weights_only=True)).eval()
    with torch.no_grad():
        lab = net(D.to_tensor(np.stack(imgs))).argmax(1)
    share = lambda n: (lab == BISENET_CLASSES.index(n)).float().mean().item()  # noqa: E731
    assert share("skin") > 0.1 and share("hair") > 0.05 and share("background") > 0.02


def test_evaluate_markdown_reports_the_hair_only_classifier_beside_the_bars() -> None:
    from training.evaluate import bars, markdown

    row = {"psnr_non_target_mean": 25.0, "psnr_non_target_median": 25.5, "hair_ratio": 2.5,
           "recognised_all": 0.85, "recognised_changed": 0.8}  # fmt: skip
    g = {t: dict(row) for t in D.STARGAN_ATTRS}
    g["Blond_Hair"].update(hair_only_recognised_all=0.4, hair_only_recognised_changed=0.3)
    g["keep"] = {k: v for k, v in row.items() if not k.startswith("recognised")}
    res = {"G": g, "real_hair_classifier_accuracy": {"Blond_Hair": 0.9}}
    text = markdown(res)
    assert "| Blond_Hair | 25.00 / 25.50 | 2.50 | 0.850 / 0.800 | 0.400 / 0.300 |" in text
    assert "| Male | 25.00 / 25.50 | (2.50) | 0.850 / 0.800 | – |" in text
    assert "Hair-only classifier accuracy on real val faces: Blond_Hair 0.900" in text
    assert all(bars(res).values())  # the hair-only numbers are reported, not a bar
