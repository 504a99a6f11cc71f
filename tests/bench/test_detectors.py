"""``python -m bench.detectors``: RetinaFace's decoding, the measures and the section writer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import detectors as D
from magdr.faces.locate import FaceBox


def test_priors_follow_the_heads_order():
    p = D.priors(64, 96)
    # stride 8: 8x12 cells, 16: 4x6, 32: 2x3; two anchors per cell
    assert p.shape == ((8 * 12 + 4 * 6 + 2 * 3) * 2, 4)
    np.testing.assert_allclose(p[0], [4 / 96, 4 / 64, 16 / 96, 16 / 64])
    np.testing.assert_allclose(p[1], [4 / 96, 4 / 64, 32 / 96, 32 / 64])  # same cell, 2nd anchor
    np.testing.assert_allclose(p[2], [12 / 96, 4 / 64, 16 / 96, 16 / 64])  # next column
    np.testing.assert_allclose(p[24], [4 / 96, 12 / 64, 16 / 96, 16 / 64])  # next row
    np.testing.assert_allclose(p[192], [8 / 96, 8 / 64, 64 / 96, 64 / 64])  # stride 16 starts
    np.testing.assert_allclose(p[-1], [80 / 96, 48 / 64, 512 / 96, 512 / 64])
    assert D.priors(65, 97).shape[0] == (9 * 13 + 5 * 7 + 3 * 4) * 2  # ceil, as the convs give


def test_decode_offsets():
    anchors = np.array([[0.5, 0.5, 0.2, 0.4]])
    boxes, pts = D.decode(np.zeros((1, 4)), np.zeros((1, 10)), anchors)
    np.testing.assert_allclose(boxes, [[0.4, 0.3, 0.6, 0.7]])
    np.testing.assert_allclose(pts, np.full((1, 5, 2), 0.5))
    # centre moves by variance 0.1 x anchor side per unit; size doubles at log(2) / 0.2
    loc = np.array([[1.0, -1.0, math.log(2) / 0.2, 0.0]])
    landm = np.arange(10, dtype=np.float64)[None]
    boxes, pts = D.decode(loc, landm, anchors)
    np.testing.assert_allclose(boxes, [[0.32, 0.26, 0.72, 0.66]])
    np.testing.assert_allclose(pts[0, 1], [0.5 + 2 * 0.1 * 0.2, 0.5 + 3 * 0.1 * 0.4])


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5.0]])
    scores = np.array([0.8, 0.9, 0.7, 0.95])
    # IoU(0, 1) = 81/119 = 0.68; IoU(3, 1) = 36/114 = 0.32: kept at 0.4, dropped at 0.3
    assert D.nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert D.nms(boxes, scores, 0.3).tolist() == [3, 2]
    assert D.nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


def test_network_loads_the_official_names_with_a_module_prefix(tmp_path):
    torch.manual_seed(0)
    net = D.RetinaNet()
    keys = set(net.state_dict())
    for k in ("body.stage1.0.0.weight", "body.stage3.1.4.running_var", "fpn.merge2.1.bias",
              "ssh3.conv7x7_3.1.weight", "ClassHead.2.conv1x1.weight",
              "LandmarkHead.0.conv1x1.bias"):  # fmt: skip
        assert k in keys
    assert net.ClassHead[0].conv1x1.out_channels == 4
    assert net.LandmarkHead[0].conv1x1.out_channels == 20
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    loaded = D.load_retinanet(path)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        loc, conf, landm = loaded(x)
        ref = net.eval()(x)
    assert loc.shape == (1, 252, 4) and conf.shape == (1, 252, 2) and landm.shape == (1, 252, 10)
    torch.testing.assert_close(conf.sum(-1), torch.ones(1, 252))
    torch.testing.assert_close(loc, ref[0])


def _dlib_face(cx: float = 100.0, cy: float = 100.0, iod: float = 40.0) -> np.ndarray:
    p = np.zeros((68, 2))
    p[36:42] = (cx - iod / 2, cy) + np.random.default_rng(0).normal(0, 1, (6, 2)) * [1, 0]
    p[36:42] -= p[36:42].mean(0) - (cx - iod / 2, cy)  # eye centre exactly there
    p[42:48] = (cx + iod / 2, cy)
    p[48], p[54] = (cx - 15, cy + 30), (cx + 15, cy + 30)
    return p


def test_landmark_error_in_percent_of_the_eye_distance():
    ref = _dlib_face()
    five = np.array([[80, 100], [120, 100], [100, 115], [85, 130], [115, 130]], np.float64)
    np.testing.assert_allclose(D.landmark_error(five, ref), [0, 0, 0, 0], atol=1e-9)
    five[0] += (4, 0)  # 4 px of a 40 px eye distance
    five[4] += (0, -2)
    np.testing.assert_allclose(D.landmark_error(five, ref), [10, 0, 0, 5])


def test_match_pairs_boxes_one_to_one():
    a = [FaceBox(0, 0, 10, 10, 1.0), FaceBox(50, 50, 10, 10, 1.0)]
    b = [FaceBox(52, 50, 10, 10, 1.0), FaceBox(1, 0, 10, 10, 1.0), FaceBox(0, 0, 10, 10, 1.0)]
    assert sorted(D.match(a, b)) == [(0, 2), (1, 0)]
    assert D.match(a, [FaceBox(7, 7, 10, 10, 1.0)]) == []  # IoU 9/191 < 0.3


def _det(frames, missed, false, found, err, n_err, ms, stills):
    return {"frames": frames, "missed": missed, "false_boxes": false, "portraits_found": found,
            "landmark_error": err, "landmark_faces": n_err, "ms_720p": ms, "frames_720p": 14,
            "portraits": stills}  # fmt: skip


def test_section_table_rows():
    results = {
        "command": "python -m bench.detectors --every 30", "commit": "abc1234", "side": 320,
        "every": 30, "clips": 11, "portraits": 2, "cpus": 2, "load_avg": 2.5, "dlib": True,
        "retinaface_sha256": "2979b33ffafda5d74b69", "notes": [],
        "detectors": {
            "haar+dlib": _det(140, 3, 2, 1, None, 0, 9.25, {"cat": 1, "s1": 1}),
            "yunet": _det(140, 0, 0, 2, 4.123, 137, 4.04, {"cat": 0, "s1": 2}),
        },
    }  # fmt: skip
    text = D.section(results)
    lines = text.splitlines()
    assert lines[0] == "## Face detectors"
    assert "`python -m bench.detectors --every 30`" in text and "`2979b33ffafd…`" in text
    assert (
        "| detector | clip frames | missed | false boxes | portraits with ≥1 face (of 2) | "
        "landmark error, median % IOD | ms per 720p frame |"
    ) in lines
    assert "| haar+dlib | 140 | 3 | 2 | 1 | reference | 9.2 |" in lines
    assert "| yunet | 140 | 0 | 0 | 2 | 4.1 (137 faces) | 4.0 |" in lines
    assert "Boxes per portrait (haar+dlib / yunet): cat 1/0, s1 1/2." in lines
    results["notes"] = ["retinaface skipped: no weights"]
    results["detectors"]["yunet"]["ms_720p"] = None
    lines = D.section(results).splitlines()
    assert "| yunet | 140 | 0 | 0 | 2 | 4.1 (137 faces) | – |" in lines
    assert lines[-1] == "Not measured: retinaface skipped: no weights."


@pytest.mark.parametrize("argv", [["--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        D.main(argv)
    assert e.value.code == 0
    assert "--retinaface" in capsys.readouterr().out
