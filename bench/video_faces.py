"""Faces of real video through the daemon's own face path: detectors, alignment, temporal rule.

Measurements behind issue 17 (parts 1 and 3), each one command; numbers go to stdout::

    # Haar cascade (the daemon's locator) beside dlib's HOG detector, frames with 0 / 2+ faces
    python -m bench.video_faces detectors [--every 15]
    # per face: PSNR(G(x, c_keep), x) and S_final under the daemon's edit, box crop vs aligned
    python -m bench.video_faces faces [CLIP ...] --every 10 --out /tmp/faces.jsonl
    # k-of-n per face track: clean faces flagged against attacked frames passed
    python -m bench.video_faces temporal --clean /tmp/clean.jsonl --attacked /tmp/adv.jsonl
    # frames/s of magdr-guard process with align off and on (and the guard off), one run
    python -m bench.video_faces fps CLIP [--repeats 2]

``faces`` frames every face as :meth:`daemon.engine.Engine.find_faces` does (through
:class:`daemon.face_crops.Framing`, the daemon's ``[guard]`` defaults) twice, with ``align``
off and on, and adds CelebA's validation faces ``008001``-``009000`` (``$MAGDR_DATA``) as the
reference. c_keep is the default G's "keep" condition (``G.neutral``: no hair colour, Male and
Young 0.5; MODEL_CARD); S_final is the shipped guard's, under ``[model] condition``.
Clips default to every clip in ``$MAGDR_DATA/videos``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from daemon import media
from daemon.config import Config
from daemon.framing import Framing, landmark_locator
from daemon.tracks import Tracker

#: (k, n) rules the temporal measurement compares; (1, 1) is every frame on its own.
RULES = [(1, 1), (2, 2), (2, 3), (3, 3), (3, 5)]


def _data() -> Path:
    from magdr.celeba import data_root

    return data_root()


def _clips(given: Sequence[str]) -> list[Path]:
    return [Path(c) for c in given] or sorted((_data() / "videos").glob("*.mp4"))


def _frames(path: Path, every: int) -> Iterator[media.Frame]:
    for frame in media.decode(path, Config().guard.max_frame_pixels):
        if frame.index % every == 0:
            yield frame


# ---- detectors ------------------------------------------------------------------------------
def detectors(every: int) -> None:
    """Frames with no face and with more than one, Haar (as the daemon runs it) beside HOG."""
    import cv2
    import dlib  # type: ignore[import-not-found]

    from magdr.faces.align import LandmarkLocator, align_matrices, anchor_points, face_matrices
    from magdr.faces.locate import locate_faces

    g = Config().guard
    hog = dlib.get_frontal_face_detector()
    landmarks = LandmarkLocator()
    print(
        "| clip | frames | Haar: none | Haar: 2+ | HOG: none | HOG: 2+ | Haar faces | "
        "aligned on the box square (landmarks not sane) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for clip in _clips([]):
        n = defaultdict(int)
        for frame in _frames(clip, every):
            img = frame.image
            k = min(1.0, g.detect_side / max(img.shape[:2]))
            small = cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
            boxes = locate_faces(img, min_size=g.min_face, max_side=g.detect_side)
            haar, found = len(boxes), len(hog(small, 0))
            if boxes:
                pts = landmarks(img, boxes)
                fitted = align_matrices(anchor_points(pts), 128)
                n["fallback"] += int((face_matrices(pts, boxes, 128) != fitted).any((1, 2)).sum())
            n["faces"] += haar
            n["frames"] += 1
            n["haar0"] += haar == 0
            n["haar2"] += haar > 1
            n["hog0"] += found == 0
            n["hog2"] += found > 1
        print(
            f"| {clip.name} | {n['frames']} | {n['haar0']} | {n['haar2']} | {n['hog0']} | "
            f"{n['hog2']} | {n['faces']} | {n['fallback']} |",
            flush=True,
        )


# ---- faces ----------------------------------------------------------------------------------
def _models(cond: dict[str, float]) -> tuple:
    import magdr

    G = magdr.load_generator("default")
    guard = magdr.Guard(G, device="cpu")
    return G, guard, magdr.condition(G, {})[0], magdr.condition(G, cond)[0]


@torch.no_grad()
def _measure(x: torch.Tensor, models: tuple, batch: int = 16) -> tuple[list, list]:
    """PSNR(G(x, c_keep), x) and S_final(x, c_edit) per face."""
    from magdr.metrics import psnr

    G, guard, keep, edit = models
    ps, scores = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        ps += psnr(G(xb, keep.expand(len(xb), -1)), xb).tolist()
        scores += guard.detect(xb, edit.expand(len(xb), -1)).score.tolist()
    return ps, scores


def faces(clips: Sequence[str], every: int, out: Path, celeba: int) -> None:
    """Per-face records (JSON lines) for both framings, then a summary table."""
    cfg = Config()
    models = _models(cfg.model.condition)
    threshold = float(models[1].profile.threshold)
    framings = {}
    for align in (False, True):
        c = copy.deepcopy(cfg)
        c.guard.align = align
        framings[align] = Framing(c, 128, landmark_locator(c))
    if framings[True].landmarks is None:
        sys.exit("dlib's landmark model is missing: the aligned framing cannot be measured")
    rows = []
    with open(out, "w") as f:
        for clip in _clips(clips):
            for align, framing in framings.items():
                xs, meta = [], []
                for frame in _frames(clip, every):
                    crops = framing.find_faces(frame.image)
                    xs.append(crops.x)
                    meta += [(frame.index, box) for box in crops.boxes]
                x = torch.cat(xs) if xs else torch.zeros(0, 3, 128, 128)
                ps, scores = _measure(x, models)
                for (index, box), p, s in zip(meta, ps, scores, strict=True):
                    rec = {
                        "clip": clip.name,
                        "frame": index,
                        "box": box,
                        "align": align,
                        "psnr_keep": p,
                        "score": s,
                    }
                    f.write(json.dumps(rec) + "\n")
                    rows.append(rec)
                print(f"{clip.name} align={align}: {len(meta)} faces", file=sys.stderr)
    print(f"threshold {threshold:.6g}; every {every}th frame")
    print("| clip | faces | PSNR keep, box / aligned (dB) | flagged, box / aligned |")
    print("| --- | --- | --- | --- |")
    for clip in dict.fromkeys(r["clip"] for r in rows):
        by = {a: [r for r in rows if r["clip"] == clip and r["align"] == a] for a in (0, 1)}
        print(
            f"| {clip} | {len(by[0])} / {len(by[1])} | "
            f"{np.mean([r['psnr_keep'] for r in by[0]]):.2f} / "
            f"{np.mean([r['psnr_keep'] for r in by[1]]):.2f} | "
            f"{sum(r['score'] > threshold for r in by[0])} / "
            f"{sum(r['score'] > threshold for r in by[1])} |"
        )
    for a in (0, 1):
        sel = [r for r in rows if r["align"] == a]
        print(
            f"all clips, align={bool(a)}: {len(sel)} faces, PSNR keep "
            f"{np.mean([r['psnr_keep'] for r in sel]):.2f} dB, flagged "
            f"{sum(r['score'] > threshold for r in sel)} "
            f"({100 * np.mean([r['score'] > threshold for r in sel]):.1f}%)"
        )
    if celeba:
        from magdr.celeba import CELEBA_VAL, load_celeba, to_tensor

        cel = load_celeba()
        idx = np.array(CELEBA_VAL)[:celeba] - 1
        ps, scores = _measure(to_tensor(cel["images"][idx]), models)
        over = np.array(scores) > threshold
        print(
            f"CelebA validation ({len(idx)} faces): PSNR keep {np.mean(ps):.2f} dB, flagged "
            f"{over.sum()} ({100 * over.mean():.1f}%)"
        )


# ---- temporal -------------------------------------------------------------------------------
def _sequences(path: Path, threshold: float) -> dict[str, list[list[bool]]]:
    """Per clip, per face track, the frames' above-threshold flags in frame order (aligned)."""
    recs = [json.loads(line) for line in open(path)]
    recs = [r for r in recs if r["align"]]
    out: dict[str, list[list[bool]]] = defaultdict(list)
    for clip in dict.fromkeys(r["clip"] for r in recs):
        tracker, seqs = Tracker(1, 1), {}
        frames = defaultdict(list)
        for r in recs:
            if r["clip"] == clip:
                frames[r["frame"]].append(r)
        for index in sorted(frames):
            faces = frames[index]
            for r, t in zip(faces, tracker.assign(clip, [r["box"] for r in faces]), strict=True):
                seqs.setdefault(id(t), []).append(r["score"] > threshold)
        out[clip] = list(seqs.values())
    return out


def _flagged(seq: list[bool], k: int, n: int) -> list[bool]:
    """Which frames of one track a k-of-n rule reconstructs (the daemon's :class:`Track`)."""
    from daemon.tracks import Track

    t = Track(k, n)
    return [t.update(o) and o for o in seq]


def temporal(clean: Path, attacked: Path | None) -> None:
    """Clean faces flagged, and attacked frames passed from an attack's start, per rule."""
    from magdr.profile import load_profile

    threshold = float(load_profile("default").threshold)
    tracks = _sequences(clean, threshold)
    adv = _sequences(attacked, threshold) if attacked else {}
    print(f"threshold {threshold:.6g}")
    print(
        "| rule k/n | clean faces flagged | attacked faces over the threshold | "
        "frames passed from an attack's start: mean / max |"
    )
    print("| --- | --- | --- | --- |")
    for k, n in RULES:
        total = sum(len(s) for v in tracks.values() for s in v)
        flagged = sum(sum(_flagged(s, k, n)) for v in tracks.values() for s in v)
        passed, over = [], 0
        for seqs in adv.values():
            for s in seqs:
                over += sum(s)
                # an attack starting at frame a of the track: frames until the first flagged one
                for a in range(len(s)):
                    hits = _flagged(s[a:], k, n)
                    passed.append(hits.index(True) if any(hits) else len(hits))
        stat = f"{np.mean(passed):.2f} / {max(passed)}" if passed else "-"
        n_adv = sum(len(s) for v in adv.values() for s in v)
        print(
            f"| {k}/{n} | {flagged} of {total} ({100 * flagged / max(total, 1):.2f}%) | "
            f"{over} of {n_adv} | {stat} |"
        )


# ---- fps ------------------------------------------------------------------------------------
def process_fps(
    clip: Path, out: Path, threads: int, guard: bool, config: Path | None = None
) -> float:
    """Frames/s that ``magdr-guard process`` reports for ``clip`` (a fresh process each time)."""
    import subprocess

    cmd = [sys.executable, "-m", "daemon", "process", str(clip), "--out", str(out),
           "--no-progress", "--threads", str(threads)]  # fmt: skip
    cmd += ["--config", str(config)] if config else []
    subprocess.run(cmd + ([] if guard else ["--no-guard"]), check=True, capture_output=True)
    return float(json.loads(next(out.glob("*.summary.json")).read_text())["fps"])


def fps(clip: Path, threads: int, repeats: int) -> None:
    """Frames/s of ``magdr-guard process`` on one clip: align off / on, guard on / off.

    Settings alternate within each repeat and the best of the repeats is kept, so that a
    shared machine's load drifts into every setting alike.
    """
    import tempfile

    print(f"| {clip.name} | align | guard | frames/s (best of {repeats}) |")
    print("| --- | --- | --- | --- |")
    got: dict[tuple[bool, bool], float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for guard in (True, False):
                for align in (False, True) if r % 2 == 0 else (True, False):
                    cfg, out = Path(tmp, "c.toml"), Path(tmp, f"out-{r}-{guard}-{align}")
                    cfg.write_text(f"[guard]\nalign = {str(align).lower()}\n")
                    v = process_fps(clip, out, threads, guard, cfg)
                    got[guard, align] = max(got[guard, align], v)
    for (guard, align), v in sorted(got.items(), reverse=True):
        print(f"| | {align} | {guard} | {v:.2f} |")
    for guard in (True, False):
        print(
            f"guard {'on' if guard else 'off'}: aligned / box = "
            f"{got[guard, True] / got[guard, False]:.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.video_faces``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.video_faces", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("detectors", help="Haar beside HOG on the shared clips")
    d.add_argument("--every", type=int, default=15)
    f = sub.add_parser("faces", help="PSNR keep and S_final per face, box crop vs aligned")
    f.add_argument("clips", nargs="*")
    f.add_argument("--every", type=int, default=10)
    f.add_argument("--out", type=Path, required=True, help="per-face records (.jsonl)")
    f.add_argument("--celeba", type=int, default=1000, help="CelebA validation faces (0: none)")
    t = sub.add_parser("temporal", help="k-of-n rules on records of consecutive frames")
    t.add_argument("--clean", type=Path, required=True)
    t.add_argument("--attacked", type=Path)
    p = sub.add_parser("fps", help="magdr-guard process frames/s, align off and on")
    p.add_argument("clip", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    if a.cmd in ("detectors", "faces"):  # the runs of G; 'temporal' only counts (tests call it)
        torch.set_num_threads(2)
    if a.cmd == "detectors":
        detectors(a.every)
    elif a.cmd == "faces":
        faces(a.clips, a.every, a.out, a.celeba)
    elif a.cmd == "fps":
        fps(a.clip, a.threads, a.repeats)
    else:
        temporal(a.clean, a.attacked)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
