"""``python -m daemon.face_crops``: video face crops for calibration, framed like the daemon."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from daemon import face_crops, media
from daemon.config import Config
from magdr.faces.align import point_matrices, warp_faces
from magdr.faces.detector import CROP_FRAMING, load_detector
from magdr.faces.locate import crop_faces
from tests.conftest import data_dir
from tests.daemon.helpers import make_clip

PORTRAIT = data_dir() / "portraits" / "d12.jpg"


def portrait_clip(path: Path, frames: int = 6, side: int = 320) -> list[np.ndarray]:
    """A short clip of a real portrait drifting sideways; returns the decoded frames."""
    img = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 10)
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.roll(img, 2 * i, axis=1), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return [f.image for f in media.decode(path, 1 << 30)]


@pytest.mark.skipif(not PORTRAIT.is_file(), reason=f"{PORTRAIT} absent")
class TestPortraitClip:
    @pytest.mark.parametrize("align", [False, True])
    def test_same_crops_as_the_daemon(self, tmp_path, align):
        frames = portrait_clip(tmp_path / "p.mp4")
        cfg = Config()
        cfg.guard.align = align
        images, sources = face_crops.clip_crops(tmp_path / "p.mp4", cfg, size=64, every=2)
        g = cfg.guard
        detect = load_detector(g.detector)
        want, names = [], []
        for i in range(0, len(frames), 2):
            boxes = detect(
                frames[i], min_size=g.min_face, max_faces=g.max_faces, max_side=g.detect_side
            )
            if boxes and align:
                x = warp_faces(frames[i], point_matrices(boxes, 64, CROP_FRAMING[g.detector]), 64)
            elif boxes:
                scale, shift = CROP_FRAMING[g.detector]
                x, _ = crop_faces(frames[i], boxes, 64, scale=scale, shift=shift)
            if boxes:
                want += list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
                names += [f"p.mp4#{i}"] * len(boxes)
        assert len(want) >= 2, "the portrait should show a face"
        assert images.dtype == np.uint8 and images.shape == (len(want), 64, 64, 3)
        np.testing.assert_array_equal(images, np.stack(want))
        assert sources == names

    def test_cli_writes_npz(self, tmp_path, capsys):
        portrait_clip(tmp_path / "p.mp4", frames=4)
        out = tmp_path / "c.npz"
        argv = [str(tmp_path / "p.mp4"), "--out", str(out), "--max-per-clip", "2", "--size", "32"]
        assert face_crops.main(argv) == 0
        z = np.load(out)
        assert z["images"].shape == (2, 32, 32, 3) and z["images"].dtype == np.uint8
        assert [str(s) for s in z["sources"]] == ["p.mp4#0", "p.mp4#1"]
        assert "2 crops" in capsys.readouterr().out

    def test_benign_copies_are_framed_again(self, tmp_path):
        portrait_clip(tmp_path / "p.mp4", frames=4)
        cfg = Config()
        cfg.guard.align = False
        images, sources = face_crops.clip_negatives(tmp_path / "p.mp4", cfg, size=32, every=2)
        tags = {s.partition("@")[2] for s in sources}
        want = {"", *face_crops.FRAME_BENIGN, *(f"crf{q}" for q in face_crops.REENCODE_CRF)}
        assert tags == want  # the face is found in every copy
        assert len(images) == len(sources)
        by_tag = {t: images[[s.partition("@")[2] == t for s in sources]] for t in tags}
        orig = by_tag[""].astype(np.float32)
        # brighter and darker copies, a softer down-and-up one, a lossy re-encode: all differ
        assert by_tag["bright1.3"].mean() > orig.mean() > by_tag["bright0.7"].mean()
        lap = lambda a: np.abs(cv2.Laplacian(a[0], cv2.CV_32F)).mean()  # noqa: E731
        assert lap(by_tag["scale0.3"]) < lap(by_tag[""])
        for q in face_crops.REENCODE_CRF:  # lossy, so never the same pixels
            assert np.abs(by_tag[f"crf{q}"].astype(np.float32) - orig).mean() > 0.5

    def test_calibrate_videos_hands_the_crops_to_the_fit(self, tmp_path, monkeypatch):
        from magdr import calibrate

        (tmp_path / "clips").mkdir()
        portrait_clip(tmp_path / "clips" / "p.mp4", frames=2)
        (tmp_path / "clips" / "notes.txt").write_text("not a clip")
        seen = {}

        def fake_main(argv):
            npz = argv[argv.index("--extra-negatives") + 1]
            seen["argv"], seen["n"] = argv, len(np.load(npz)["images"])
            return 0

        monkeypatch.setattr(calibrate, "main", fake_main)
        argv = ["--videos", str(tmp_path / "clips"), "--video-every", "1", "--n", "8"]
        assert face_crops.calibrate_main(argv) == 0
        assert seen["argv"][:2] == ["--n", "8"]
        n_copies = 1 + len(face_crops.FRAME_BENIGN) + len(face_crops.REENCODE_CRF)
        assert seen["n"] == 2 * n_copies  # one face in each of 2 frames, in every copy
        assert face_crops.calibrate_main(["--videos", str(tmp_path)]) == 2  # no clips there
        assert face_crops.calibrate_main(["--videos", str(tmp_path / "absent")]) == 2


def test_faceless_clip_gives_no_crops(tmp_path, capsys):
    make_clip(tmp_path / "flat.mp4", frames=3, size=(64, 48))
    out = tmp_path / "c.npz"
    assert face_crops.main([str(tmp_path / "flat.mp4"), "--out", str(out), "--size", "32"]) == 0
    assert "no faces found, 0 crops" in capsys.readouterr().out
    z = np.load(out)
    assert z["images"].shape == (0, 32, 32, 3) and len(z["sources"]) == 0


@pytest.mark.parametrize("content", [None, b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50])
def test_missing_or_corrupt_clip_fails_clearly(tmp_path, capsys, content):
    clip = tmp_path / "bad.mp4"
    if content is not None:
        clip.write_bytes(content)
    make_clip(tmp_path / "ok.mp4", frames=2)
    out = tmp_path / "c.npz"
    assert face_crops.main([str(tmp_path / "ok.mp4"), str(clip), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bad.mp4" in err and ("no such file" in err if content is None else err.strip())
    assert not out.exists()


def test_bad_every(tmp_path):
    with pytest.raises(ValueError, match="every"):
        face_crops.clip_crops(tmp_path / "x.mp4", every=0)
