"""The command line: process, attack, demo, --validate-config, --version."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from daemon.cli import main
from tests.daemon.helpers import ROOT, make_clip, read_pts, run_daemon, write_config


def test_version_and_validate(tmp_path, tiny_models, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "magdr-guard 0.1.0" in capsys.readouterr().out
    assert main(["--validate-config", str(ROOT / "config" / "default.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[guard]\nfaces = "all"\n')
    assert main(["run", "--config", str(bad), "--validate-config"]) == 2
    assert "guard.faces: expected one of detect|frame, got 'all'" in capsys.readouterr().err


def test_process_outputs_like_a_folder_sink(tmp_path, tiny_models, capsys):
    cfg = write_config(tmp_path / "c.toml", tiny_models)
    clip = tmp_path / "in" / "clip.mkv"
    clip.parent.mkdir()
    pts = make_clip(clip, frames=4, rate=12)
    cv2.imwrite(str(tmp_path / "in" / "face.jpg"), np.full((40, 40, 3), 90, np.uint8))
    out = tmp_path / "out"
    rc = main(
        [
            "process",
            str(clip),
            str(tmp_path / "in" / "face.jpg"),
            str(tmp_path / "in" / "missing.mp4"),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--no-guard",
        ]
    )
    assert rc == 1  # one input failed
    got, tb = read_pts(out / "clip.mkv")
    assert [round(float(p * tb), 3) for p in got] == [round(p / 12, 3) for p in pts]
    assert len((out / "clip.verdicts.jsonl").read_text().splitlines()) == 4
    s = json.loads((out / "face.summary.json").read_text())
    assert s["frames"] == 1 and s["profile"] == "off"
    assert cv2.imread(str(out / "face.jpg")).shape == (40, 40, 3)
    err = json.loads((out / "failed" / "missing.error.json").read_text())
    assert err["reason"] == "missing"
    text = capsys.readouterr().out
    assert "clip.mkv: 4 frames" in text and "missing.mp4: FAILED (missing)" in text


def test_attack_writes_a_lossless_disrupted_copy(tmp_path, tiny_models, capsys):
    cfg = write_config(tmp_path / "c.toml", tiny_models)
    img = np.random.default_rng(1).integers(60, 200, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "f.png"), img)
    make_clip(tmp_path / "v.mp4", frames=3, size=(32, 32))
    rc = main(
        [
            "attack",
            str(tmp_path / "f.png"),
            str(tmp_path / "v.mp4"),
            "--out",
            str(tmp_path / "adv"),
            "--config",
            str(cfg),
            "--eps",
            "0.05",
            "--steps",
            "2",
        ]
    )
    assert rc == 0
    adv = cv2.imread(str(tmp_path / "adv" / "f.adv.png"))
    diff = np.abs(adv.astype(int) - img.astype(int))
    assert 0 < diff.max() <= round(0.05 * 127.5) + 1  # within the eps ball, in pixels
    got, _ = read_pts(tmp_path / "adv" / "v.adv.mkv")
    assert len(got) == 3
    text = capsys.readouterr().out
    assert "1 faces attacked" in text and "3 faces attacked" in text
    # the report: one row per attacked frame, checked through the daemon's own crop
    rows = [json.loads(x) for x in (tmp_path / "adv" / "v.adv.mkv.report.jsonl").open()]
    assert [r["frame"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["faces"] == len(r["mse"]) == len(r["mse_same_crop"]) == len(r["boxes"]) == 1
        assert r["disrupting"] == sum(m is not None and m > 0.05 for m in r["mse"])
        assert r["lost"] == 0 and r["lossless"] is True  # decoded again, bit for bit
        # faces = "frame": the framing cannot move, so the re-crop is the attacked crop
        assert r["mse"][0] == pytest.approx(r["mse_same_crop"][0], abs=1e-4)
        assert r["flagged"] == [None]  # this configuration runs without a guard
    hit = sum(r["disrupting"] for r in rows)
    assert f"3 faces attacked, {hit} still disrupt G after the daemon's crop" in text
    assert "flagged by the guard" not in text
    assert (tmp_path / "adv" / "f.adv.png.report.jsonl").is_file()
    # --frames 1: one frame attacked, the others copied losslessly
    assert (
        main(
            [
                "attack",
                str(tmp_path / "v.mp4"),
                "--out",
                str(tmp_path / "one"),
                "--config",
                str(cfg),
                "--steps",
                "1",
                "--frames",
                "1",
                "--method",
                "ifgsm",
                "--report",
                str(tmp_path / "one.jsonl"),
            ]
        )
        == 0
    )
    (row,) = [json.loads(x) for x in (tmp_path / "one.jsonl").open()]
    assert row["faces"] == 1 and row["lossless"] is True
    import av

    with av.open(str(tmp_path / "v.mp4")) as a, av.open(str(tmp_path / "one" / "v.adv.mkv")) as b:
        same = [
            np.array_equal(x.to_ndarray(format="rgb24"), y.to_ndarray(format="rgb24"))
            for x, y in zip(a.decode(video=0), b.decode(video=0), strict=True)
        ]
    assert same.count(False) == 1


def test_demo_runs_the_daemon_path(tmp_path, tiny_models):
    cfg = write_config(tmp_path / "c.toml", tiny_models)
    make_clip(tmp_path / "clip.mp4", frames=3, size=(32, 32))
    r = run_daemon(
        "demo",
        "--config",
        str(cfg),
        "--clip",
        str(tmp_path / "clip.mp4"),
        "--out",
        str(tmp_path / "demo"),
        "--steps",
        "1",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    outbox = tmp_path / "demo" / "outbox"
    assert {p.name for p in outbox.glob("*.summary.json")} == {
        "clip.summary.json",
        "clip.adv.summary.json",
    }
    assert "clip.adv.mkv: 3 frames" in r.stdout and str(outbox) in r.stdout


def test_bundled_clip_is_small_and_licensed():
    clip = ROOT / "daemon" / "assets" / "demo.mp4"
    assert clip.stat().st_size <= 2 * 1024 * 1024
    assert "MIT License" in (ROOT / "daemon" / "assets" / "LICENSE-MIT.txt").read_text()
    got, _ = read_pts(clip)
    assert len(got) > 10


@pytest.mark.parametrize(
    ("cmd", "own_option"), [("calibrate", "--success-mse"), ("bench", "--skip-adaptive")]
)
def test_pass_through_commands_are_wired(capsys, cmd, own_option):
    try:
        rc = main([cmd, "--help"])  # the options are the module's own
    except SystemExit as e:
        rc = e.code
    assert rc == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() and own_option in out


def test_attack_on_the_crop_when_not_through_the_frame(tmp_path, tiny_models, monkeypatch):
    """``through_frame=False``: PGD on the crop, pasted back (the pre-frame-path attack); the frame
    path is not used, and the report still checks the re-cropped faces."""
    from daemon.attack import attack_file
    from daemon.config import load_config
    from magdr.faces import warp_attack

    def no_frame_path(*a, **k):
        raise AssertionError("the frame path ran")

    monkeypatch.setattr(warp_attack.FramePGD, "forward", no_frame_path)
    cfg = load_config(write_config(tmp_path / "c.toml", tiny_models))
    make_clip(tmp_path / "v.mp4", frames=2, size=(32, 32))
    rep = attack_file(cfg, tmp_path / "v.mp4", tmp_path / "v.adv.mkv", "pgd", eps=0.05,
                      steps=2, through_frame=False)  # fmt: skip
    assert rep.attacked == 2 and rep.frames == 2 and rep.lossless
    with pytest.raises(AssertionError, match="frame path"):
        attack_file(cfg, tmp_path / "v.mp4", tmp_path / "w.adv.mkv", "pgd", eps=0.05, steps=1)


def test_attack_report_gives_the_guards_verdict(tmp_path, tiny_models, capsys):
    """With the guard configured, each re-cropped face carries its verdict, and the summary
    counts the disrupting faces it flags."""
    cfg = write_config(tmp_path / "c.toml", tiny_models, guard=True)
    make_clip(tmp_path / "v.mp4", frames=2, size=(32, 32))
    rc = main(["attack", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "adv"),
               "--config", str(cfg), "--steps", "2", "--eps", "0.1"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "adv" / "v.adv.mkv.report.jsonl").open()]
    assert len(rows) == 2
    for r in rows:
        assert len(r["flagged"]) == r["faces"] == 1 and isinstance(r["flagged"][0], bool)
    flagged = sum(f for r in rows for f, m in zip(r["flagged"], r["mse"], strict=True) if m > 0.05)
    assert f"{flagged} of them flagged by the guard" in capsys.readouterr().out
