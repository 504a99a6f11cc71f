"""The "Face detectors" section: Haar + dlib, YuNet and RetinaFace on the shared clips and stills.

The face path starts with a detector (:mod:`magdr.faces.detector`); which one decides how many
faces of a stream the guard ever sees and how well they are aligned. This bench puts the
candidates side by side on the shared data (``$MAGDR_DATA``), each at the same downscaled
detection size (``--side``, the daemon's 320 px longer side) with boxes mapped back to frame
pixels::

    python -m bench.detectors --retinaface /path/to/mobilenet0.25_Final.pth

- **haar+dlib**: OpenCV's Haar cascade (``load_detector("haar")``), then dlib's 68 landmarks on
  its boxes (:class:`magdr.faces.align.LandmarkLocator`); the landmark reference below;
- **yunet**: ``load_detector("yunet")``, boxes and five points;
- **retinaface**: RetinaFace with a MobileNet-0.25 backbone (Deng et al., 2020; the MIT
  re-implementation biubug6/Pytorch_Retinaface). Its weights are not shipped: ``--retinaface``
  names a ``mobilenet0.25_Final.pth``, without it the detector is skipped. The network and its
  prior-box decoding are written out below (:class:`RetinaNet`, :func:`priors`,
  :func:`decode`, :func:`nms`), to load the official state dict as it is.

Measured per detector:

- **clips**: every ``--every``-th frame of every clip in ``videos/``. Each shows exactly one
  person, so a frame without a box is *missed* and every box past the first is *false*;
- **portraits**: the stills in ``portraits/`` with at least one box, and the count per still (a
  few are animals or artworks, where no box is the right answer);
- **landmark error**: on clip frames where the detector's box and Haar's match (IoU ≥ 0.3), its
  eye and mouth-corner points against dlib's (eye centres: means of iBUG points 36-41 and
  42-47; corners: 48 and 54); per face the mean of the four distances in % of dlib's
  inter-ocular distance, then the median over faces;
- **ms per 720p frame**: mean wall time of one call (Haar + dlib: with the landmarks) on the
  sampled frames of the clips whose shorter side is at least 720, one thread for OpenCV and
  torch, after an untimed call on each clip's first sampled frame.

``--report PATH`` writes the section into a markdown report, ``--json PATH`` the raw numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magdr.faces.detector import downscaled
from magdr.faces.locate import FaceBox, check_frame
from magdr.faces.track import iou

HEADING = "## Face detectors"
#: Table order of the detectors.
NAMES = ("haar+dlib", "yunet", "retinaface")
#: Smallest face side (frame pixels) and most faces per frame, the daemon's call.
MIN_SIZE, MAX_FACES = 32, 8
#: Boxes of two detectors are the same face from this IoU on.
MATCH_IOU = 0.3
#: Clips whose shorter side is at least this are timed.
TIMED_SIDE = 720

#: RetinaFace's anchors (``data/config.py``, ``cfg_mnet``): per pyramid level its stride and the
#: sides of its two square anchors, in input pixels; box and landmark offsets are scaled by the
#: variances.
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
#: Per-channel mean subtracted from the BGR input (the network saw 0-255 BGR minus this).
MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
RETINA_SCORE, RETINA_NMS = 0.8, 0.4

#: One detector run on an RGB frame: boxes, and dlib's 68 points per box when it gives them.
Runner = Callable[[np.ndarray], tuple[list[FaceBox], np.ndarray | None]]


# --- RetinaFace (MobileNet-0.25): module names follow the official state dict ----------------


def _conv_bn(cin: int, cout: int, stride: int = 1, leaky: float | None = 0.1, k: int = 3):
    """Conv (no bias) → BN → LeakyReLU; ``leaky=None`` leaves the activation out."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)]
    layers.append(nn.BatchNorm2d(cout))
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3×3 then pointwise 1×1, each with BN and LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class _MobileNet025(nn.Module):
    """MobileNetV1 at width 0.25, cut after its 1/8, 1/16 and 1/32 stages (64/128/256 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class _FPN(nn.Module):
    """1×1 lateral convs to 64 channels, top-down nearest upsampling, a 3×3 merge per level."""

    def __init__(self, channels: Sequence[int] = (64, 128, 256), out: int = 64) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, out, k=1) for c in channels)
        self.merge1, self.merge2 = _conv_bn(out, out), _conv_bn(out, out)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    """SSH context module: 3×3, 5×5 and 7×7 receptive fields (stacked 3×3s), concatenated."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(c, c // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(c, c // 4)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, leaky=None)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv5X5_1(x)
        b = self.conv7X7_2(a)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(a), self.conv7x7_3(b)], 1))


class _Head(nn.Module):
    """A 1×1 conv giving ``k`` numbers per anchor, flattened to ``(N, H·W·anchors, k)``."""

    def __init__(self, k: int, c: int = 64, anchors: int = 2) -> None:
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(c, anchors * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.k)


class RetinaNet(nn.Module):
    """RetinaFace MobileNet-0.25: backbone, FPN, SSH and class / box / landmark heads.

    ``forward`` takes BGR minus :data:`MEAN_BGR`, ``(N, 3, H, W)``, and returns box offsets
    ``(N, P, 4)``, face probabilities ``(N, P, 2)`` (softmax; column 1 is "face") and landmark
    offsets ``(N, P, 10)`` for the ``P`` anchors of :func:`priors` ``(H, W)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = _MobileNet025()
        self.fpn = _FPN()
        self.ssh1, self.ssh2, self.ssh3 = _SSH(), _SSH(), _SSH()
        self.ClassHead = nn.ModuleList(_Head(2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(10) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.fpn(self.body(x))
        feats = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]

        def cat(heads: nn.ModuleList) -> torch.Tensor:
            return torch.cat([h(f) for h, f in zip(heads, feats, strict=True)], 1)

        return cat(self.BboxHead), F.softmax(cat(self.ClassHead), -1), cat(self.LandmarkHead)


def priors(h: int, w: int) -> np.ndarray:
    """RetinaFace's anchors for an ``h``×``w`` input, in the order of the heads' outputs.

    Returns:
        ``float64`` :math:`(P, 4)` rows ``(cx, cy, side_x, side_y)`` as fractions of the width
        and height: per level (stride 8, 16, 32), per feature-map row and column, per anchor.
    """
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        fh, fw = math.ceil(h / step), math.ceil(w / step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / h, (np.arange(fw) + 0.5) * step / w,
                             indexing="ij")  # fmt: skip
        s = np.asarray(sizes, np.float64)
        rows = np.broadcast_arrays(cx[..., None], cy[..., None], s / w, s / h)
        out.append(np.stack(rows, -1).reshape(-1, 4))
    return np.concatenate(out)


def decode(loc: np.ndarray, landm: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, ...]:
    """Box and landmark offsets to coordinates (fractions of the input's width and height).

    Args:
        loc: :math:`(P, 4)` box offsets (centre shift in anchor sides, log size ratio).
        landm: :math:`(P, 10)` landmark offsets from the anchor centre, in anchor sides.
        anchors: :math:`(P, 4)` from :func:`priors`.

    Returns:
        ``(boxes, points)``: :math:`(P, 4)` ``(x1, y1, x2, y2)`` and :math:`(P, 5, 2)`.
    """
    v0, v1 = VARIANCES
    c, s = anchors[:, :2], anchors[:, 2:]
    centre = c + loc[:, :2] * v0 * s
    size = s * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
    points = c[:, None] + landm.reshape(-1, 5, 2) * v0 * s[:, None]
    return boxes, points


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: :math:`(B, 4)` ``(x1, y1, x2, y2)``.
        scores: :math:`(B,)`.
        threshold: a box overlapping a kept, higher-scoring one by more than this IoU is dropped.

    Returns:
        indices of the kept boxes, highest score first.
    """
    x1, y1, x2, y2 = np.asarray(boxes, np.float64).T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, np.int64)


def load_retinanet(path: str | Path) -> RetinaNet:
    """:class:`RetinaNet` in eval mode with the official weights (``module.`` prefix stripped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = RetinaNet()
    net.load_state_dict(state)
    return net.eval()


class RetinaFace:
    """RetinaFace under the call of :mod:`magdr.faces.detector`'s detectors.

    Args:
        weights: ``mobilenet0.25_Final.pth`` (biubug6/Pytorch_Retinaface).
        score_threshold: faces whose probability is at or below this are dropped.
        nms_threshold: see :func:`nms`.
    """

    def __init__(
        self,
        weights: str | Path,
        score_threshold: float = RETINA_SCORE,
        nms_threshold: float = RETINA_NMS,
    ) -> None:
        self.net = load_retinanet(weights)
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self._priors: dict[tuple[int, int], np.ndarray] = {}

    @torch.inference_mode()
    def __call__(
        self,
        frame: np.ndarray,
        *,
        min_size: int = MIN_SIZE,
        max_faces: int | None = MAX_FACES,
        max_side: int = 320,
    ) -> list[FaceBox]:
        """Faces of an RGB frame, largest first, with five points (YuNet's order)."""
        frame = check_frame(frame)
        if min(frame.shape[:2]) == 0:
            return []
        small, k = downscaled(frame, max_side)  # the same area downscale YuNet gets
        h, w = small.shape[:2]
        x = torch.from_numpy(small[..., ::-1].astype(np.float32) - MEAN_BGR)
        loc, conf, landm = (t[0].numpy() for t in self.net(x.permute(2, 0, 1)[None]))
        if (h, w) not in self._priors:
            self._priors[(h, w)] = priors(h, w)
        sel = conf[:, 1] > self.score_threshold
        score = conf[sel, 1]
        boxes, points = decode(loc[sel], landm[sel], self._priors[(h, w)][sel])
        keep = nms(boxes, score, self.nms_threshold)
        scale = np.array([w, h], np.float64) / k
        out = []
        for i in keep:
            (x1, y1), (x2, y2) = boxes[i, :2] * scale, boxes[i, 2:] * scale
            if min(x2 - x1, y2 - y1) < min_size:
                continue
            pts = points[i] * scale
            for a, b in ((0, 1), (3, 4)):  # image-left point first, as YuNet's
                if pts[a, 0] > pts[b, 0]:
                    pts[[a, b]] = pts[[b, a]]
            w_i, h_i = round(x2 - x1), round(y2 - y1)
            out.append(FaceBox(round(x1), round(y1), w_i, h_i, float(score[i]), pts))
        out.sort(key=lambda b: (-b.w * b.h, -b.score))
        return out if max_faces is None else out[:max_faces]


# --- measures ---------------------------------------------------------------------------------


def match(a: Sequence[FaceBox], b: Sequence[FaceBox], threshold: float = MATCH_IOU):
    """Greedy one-to-one pairs ``(i, j)`` of ``a[i]`` and ``b[j]`` by IoU, best first."""
    pairs = sorted(((iou(p, q), i, j) for i, p in enumerate(a) for j, q in enumerate(b)),
                   reverse=True)  # fmt: skip
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for v, i, j in pairs:
        if v >= threshold and i not in used_a and j not in used_b:
            out.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return out


def landmark_error(points: np.ndarray, dlib68: np.ndarray) -> np.ndarray:
    """Distances of a detector's eyes and mouth corners from dlib's, in % of the eye distance.

    Args:
        points: :math:`(5, 2)` image-left eye, image-right eye, nose, image-left and
            image-right mouth corner.
        dlib68: :math:`(68, 2)` iBUG points of the same face.

    Returns:
        :math:`(4,)`: image-left eye, image-right eye, left and right mouth corner, each in % of
        the distance between dlib's eye centres (means of points 36-41 and 42-47).
    """
    p = np.asarray(dlib68, np.float64)
    ref = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[48], p[54]])
    iod = float(np.linalg.norm(ref[1] - ref[0]))
    got = np.asarray(points, np.float64)[[0, 1, 3, 4]]
    return 100.0 * np.linalg.norm(got - ref, axis=1) / max(iod, 1e-9)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runners(side: int, retinaface: Path | None) -> tuple[dict[str, Runner], list[str], dict]:
    """The detectors to compare, the notes on what was skipped, and provenance."""
    from magdr.faces.detector import load_detector

    notes: list[str] = []
    info: dict[str, Any] = {"dlib": True}
    kw = {"min_size": MIN_SIZE, "max_faces": MAX_FACES, "max_side": side}
    haar, yunet = load_detector("haar"), load_detector("yunet")
    try:
        from magdr.faces.align import LandmarkLocator

        locator: Any = LandmarkLocator()
    except (FileNotFoundError, ImportError) as e:
        locator = None
        info["dlib"] = False
        notes.append(f"dlib's landmarks skipped ({e}): no landmark error, Haar timed alone")

    def run_haar(frame: np.ndarray) -> tuple[list[FaceBox], np.ndarray | None]:
        boxes = haar(frame, **kw)
        return boxes, (locator(frame, boxes) if locator is not None else None)

    out: dict[str, Runner] = {"haar+dlib": run_haar, "yunet": lambda f: (yunet(f, **kw), None)}
    if retinaface is not None and Path(retinaface).is_file():
        rf = RetinaFace(retinaface)
        info["retinaface_sha256"] = _sha256(Path(retinaface))
        out["retinaface"] = lambda f: (rf(f, **kw), None)
    else:
        where = f" ({retinaface} not found)" if retinaface is not None else ""
        notes.append(f"retinaface skipped: no weights{where}; pass `--retinaface PATH` to a "
                     "`mobilenet0.25_Final.pth` of biubug6/Pytorch_Retinaface")  # fmt: skip
    return out, notes, info


def _frames(path: Path, every: int):
    from daemon import media

    for frame in media.decode(path, 1 << 40):
        if frame.index % every == 0:
            yield frame.image


def measure(
    dets: dict[str, Runner], clips: Sequence[Path], portraits: Sequence[Path], every: int
) -> dict[str, Any]:
    """Run every detector on the sampled clip frames and the stills; the raw numbers."""
    from daemon import media

    res: dict[str, dict[str, Any]] = {
        n: {"frames": 0, "missed": 0, "false_boxes": 0, "ms": [], "errors": [], "clips": {}}
        for n in dets
    }
    for clip in clips:
        per = {n: {"frames": 0, "missed": 0, "false_boxes": 0} for n in dets}
        first = True
        for img in _frames(clip, every):
            timed = min(img.shape[:2]) >= TIMED_SIDE
            found: dict[str, tuple[list[FaceBox], np.ndarray | None]] = {}
            for name, run in dets.items():
                if timed and first:
                    run(img)  # untimed: network set-up for this frame size
                t0 = time.perf_counter()
                found[name] = run(img)
                dt = time.perf_counter() - t0
                if timed:
                    res[name]["ms"].append(1000 * dt)
                n = len(found[name][0])
                for d in (res[name], per[name]):
                    d["frames"] += 1
                    d["missed"] += n == 0
                    d["false_boxes"] += max(0, n - 1)
            first = False
            ref_boxes, ref_marks = found.get("haar+dlib", ([], None))
            if ref_marks is None:
                continue
            for name, (boxes, _) in found.items():
                for i, j in match(ref_boxes, boxes):
                    if boxes[j].points is not None:
                        res[name]["errors"].append(landmark_error(boxes[j].points, ref_marks[i]))
        for name in dets:
            res[name]["clips"][clip.name] = per[name]
    for name in dets:
        res[name]["portraits"] = {}
    for path in portraits:
        img = next(iter(media.decode(path, 1 << 40))).image
        for name, run in dets.items():
            res[name]["portraits"][path.stem] = len(run(img)[0])
    out: dict[str, Any] = {}
    for name, r in res.items():
        err = np.asarray(r["errors"]).reshape(-1, 4)
        out[name] = {
            "frames": r["frames"],
            "missed": r["missed"],
            "false_boxes": r["false_boxes"],
            "portraits": r["portraits"],
            "portraits_found": sum(v > 0 for v in r["portraits"].values()),
            "landmark_faces": len(err),
            "landmark_error": float(np.median(err.mean(1))) if len(err) else None,
            "landmark_error_eyes": float(np.median(err[:, :2])) if len(err) else None,
            "landmark_error_mouth": float(np.median(err[:, 2:])) if len(err) else None,
            "ms_720p": float(np.mean(r["ms"])) if r["ms"] else None,
            "frames_720p": len(r["ms"]),
            "clips": r["clips"],
        }
    return out


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def section(results: dict[str, Any]) -> str:
    """The markdown section, from :func:`main`'s results (``detectors``, settings, notes)."""
    dets: dict[str, dict[str, Any]] = results["detectors"]
    n_still = results["portraits"]
    any_det = next(iter(dets.values()))
    timed = any_det["frames_720p"]
    sha = results.get("retinaface_sha256")
    retina = (
        f" RetinaFace: MobileNet-0.25 (biubug6/Pytorch_Retinaface, MIT; weights sha256 "
        f"`{sha[:12]}…`), score > {RETINA_SCORE}, NMS IoU {RETINA_NMS}."
        if sha
        else ""
    )
    # the timings share the CPU with whatever else ran: say so when it was busy
    busy = (
        " (a busy machine: timings are noisy)"
        if results["load_avg"] > 0.75 * results["cpus"]
        else ""
    )
    head = (
        f"Every {results['every']}th frame of the {results['clips']} shared clips "
        f"({any_det['frames']} frames, one person in each: a frame without a box is *missed*, "
        f"each box past the first is *false*) and the {n_still} portrait stills (some animals or "
        f"artworks), each detector on the frame area-downscaled to {results['side']} px on its "
        f"longer side (faces ≥ {MIN_SIZE} px, at most {MAX_FACES}), boxes in frame pixels. "
        f"*Landmark error*: on clip frames where a detector's box matches Haar's (IoU ≥ "
        f"{MATCH_IOU}), its eye and mouth-corner points against dlib's 68 (eye centres: points "
        "36–41 and 42–47; corners 48 and 54), per face the mean of the four distances in % of "
        "dlib's inter-ocular distance, median over the faces counted. *ms*: mean wall time of "
        f"one call (haar+dlib: with dlib's landmarks) on the {timed} sampled frames of the clips "
        f"with a shorter side ≥ {TIMED_SIDE}, one thread (OpenCV and torch), "
        f"{results['cpus']}-core CPU, load average {results['load_avg']:.1f} at the end"
        f"{busy}.{retina} Made by `{results['command']}` at commit "
        f"`{results['commit']}`."
    )
    lines = [
        HEADING,
        "",
        head,
        "",
        "| detector | clip frames | missed | false boxes | portraits with ≥1 face "
        f"(of {n_still}) | landmark error, median % IOD | ms per 720p frame |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in dets.items():
        if name == "haar+dlib":
            err = "reference" if results.get("dlib", True) else "–"
        elif d["landmark_error"] is None:
            err = "–"
        else:
            err = f"{d['landmark_error']:.1f} ({d['landmark_faces']} faces)"
        lines.append(
            f"| {name} | {d['frames']} | {d['missed']} | {d['false_boxes']} | "
            f"{d['portraits_found']} | {err} | {_num(d['ms_720p'])} |"
        )
    stills = list(any_det["portraits"])
    per = ", ".join(f"{s} {'/'.join(str(d['portraits'][s]) for d in dets.values())}"
                    for s in stills)  # fmt: skip
    lines += ["", f"Boxes per portrait ({' / '.join(dets)}): {per}."]
    lines += [f"Not measured: {n}." for n in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def celeba_anchor(root: Path | None, step: int = 4) -> dict[str, Any]:
    """YuNet on CelebA's aligned train crops: where its points fall and how its box frames them.

    The numbers behind ``magdr.faces.align.CELEBA_ANCHOR_5`` (mean eye centres and mouth-corner
    midpoint over every ``step``-th train face dlib found, as fractions of the 128-px crop) and
    ``magdr.faces.detector.CROP_FRAMING["yunet"]`` (the crop's side in box sides and the upward
    shift of its centre in box heights, medians with their 10th-90th percentiles).
    """
    from magdr.celeba import CELEBA_TRAIN, SIZE, load_celeba
    from magdr.faces.align import five_point_anchors
    from magdr.faces.detector import load_detector

    data = load_celeba(root)
    detect = load_detector("yunet")
    idx = [i - 1 for i in CELEBA_TRAIN[::step] if data["detected"][i - 1]]
    anchors, scales, shifts, missed = [], [], [], 0
    for i in idx:
        boxes = detect(data["images"][i], min_size=16, max_faces=1, max_side=SIZE)
        if not boxes:
            missed += 1
            continue
        b = boxes[0]
        anchors.append(five_point_anchors(b.points) / SIZE)
        scales.append(SIZE / max(b.w, b.h))
        shifts.append((b.y + b.h / 2 - SIZE / 2) / b.h)

    def spread(v: list[float]) -> list[float]:
        return [float(np.median(v)), *map(float, np.percentile(v, [10, 90]))]

    return {
        "faces": len(idx),
        "missed": missed,
        "anchor": np.mean(anchors, 0).round(5).tolist(),
        "scale_median_p10_p90": spread(scales),
        "shift_median_p10_p90": spread(shifts),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.detectors``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.detectors", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--data", type=Path, default=None, help="default: magdr.celeba.data_root()")
    ap.add_argument("--retinaface", type=Path, default=None, help="mobilenet0.25_Final.pth")
    ap.add_argument("--side", type=int, default=320, help="detection size, longer side (px)")
    ap.add_argument("--every", type=int, default=30, help="clips: every Nth frame")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument("--report", type=Path, default=None, help="write '## Face detectors' there")
    ap.add_argument(
        "--celeba-anchor",
        action="store_true",
        help="instead: YuNet's anchor and box framing on CelebA's train crops",
    )
    a = ap.parse_args(argv)
    from bench.run_info import commit
    from magdr.celeba import data_root

    if a.celeba_anchor:
        print(json.dumps(celeba_anchor(a.data)))
        return 0

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    t0 = time.time()
    root = data_root(a.data)
    clips = sorted((root / "videos").glob("*.mp4"))
    stills = sorted((root / "portraits").glob("*.jpg"))
    if not clips or not stills:
        raise SystemExit(f"no clips or portraits under {root} (see its README.md)")
    dets, notes, info = runners(a.side, a.retinaface)
    results: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.detectors", *(argv if argv is not None else sys.argv[1:])]
        ),  # fmt: skip
        "commit": commit(),
        "side": a.side,
        "every": a.every,
        "clips": len(clips),
        "portraits": len(stills),
        "notes": notes,
        **info,
        "detectors": measure(dets, clips, stills, a.every),
    }
    results["cpus"] = os.cpu_count()
    results["load_avg"] = os.getloadavg()[0]
    results["wall_s"] = time.time() - t0
    text = section(results)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.report:
        from bench.report import put_section

        put_section(a.report, HEADING, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
