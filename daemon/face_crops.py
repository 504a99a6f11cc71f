"""Face crops of real video frames, cut exactly the way the daemon cuts them.

Why: the shipped profile's threshold is fitted on CelebA-aligned crops, but the daemon guards
faces it located and framed itself (OpenCV boxes on a downscaled frame, the CelebA-like square
of :func:`magdr.faces.locate.crop_faces`, a video codec's artefacts). These crops let a
deployment check its false-alarm rate on its own kind of footage, and add clean negatives to
``python -m magdr.calibrate --extra-negatives`` (the ``magdr`` package does no video I/O, so
the video side lives here). With the absolute distances of the profile shipped before, most
clips' crops scored *lower* than CelebA's and one green-screen clip far higher; the per-face
benchmark of the current profile (``magdr.detect``) keeps every test clip below its threshold
(model card). Check per clip before pooling.

The framing is not re-implemented: every frame goes through
:meth:`daemon.framing.Framing.find_faces` (what :meth:`daemon.engine.Engine.find_faces` calls)
with the daemon's ``[guard]`` settings (``detector``, ``detect_side``, ``min_face``,
``max_faces``, ``faces``, ``align``) and crop side, and frames come from the daemon's own decoder,
:func:`daemon.media.decode`::

    python -m daemon.face_crops CLIP [CLIP ...] --out crops.npz [--every N] [--max-per-clip M]
                                [--benign]

``--benign`` adds the crops of benign copies of each clip (:func:`clip_negatives`): the clean
negatives ``magdr-guard calibrate --videos DIR`` fits the profile on.

The ``.npz`` holds ``images`` uint8 ``[N, S, S, 3]`` RGB and ``sources`` (``"clip.mp4#frame"``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon import media
from daemon.config import Config, load_config
from daemon.framing import Framing


def clip_crops(
    path: str | Path,
    cfg: Config | None = None,
    size: int = 128,
    every: int = 1,
    max_per_clip: int = 0,
    on_corrupt: Any = None,
    process: Callable[[np.ndarray], np.ndarray] | None = None,
    tag: str = "",
) -> tuple[np.ndarray, list[str]]:
    """Crops of the faces in every ``every``-th frame of one clip (or image), daemon-framed.

    Args:
        path: the video or image.
        cfg: the daemon configuration whose ``[guard]`` settings frame the faces (defaults:
            ``Config()``, the documented defaults of ``config/default.toml``).
        size: crop side (the generator's ``image_size``: the daemon's ``Engine.size``).
        every: take frames 0, N, 2N, ... (consecutive frames of a talking head are near
            duplicates).
        max_per_clip: stop after this many crops (0 = no limit).
        on_corrupt: ``(pts, error)`` callback for video packets the decoder rejects (as the
            daemon does, they are skipped); None fails the clip on the first one.
        process: applied to each chosen frame before its faces are located (a benign copy:
            :data:`FRAME_BENIGN`).
        tag: appended to each source as ``@tag`` (which copy the crop comes from).

    Returns:
        ``(images, sources)``: uint8 ``[N, size, size, 3]`` RGB and ``"NAME#frame[@tag]"`` per
        crop (several faces of one frame share the frame's source).

    Raises:
        media.MediaError: missing, unreadable, corrupt or truncated clip.
    """
    if every < 1:
        raise ValueError(f"every: expected >= 1, got {every}")
    cfg = cfg or Config()
    framing = Framing(cfg, size)
    name = Path(path).name
    images: list[np.ndarray] = []
    sources: list[str] = []
    for frame in media.decode(path, cfg.guard.max_frame_pixels, on_corrupt=on_corrupt):
        if frame.index % every:
            continue
        image = frame.image if process is None else process(frame.image)
        crops = framing.find_faces(image)  # no stream: no box reuse across frames
        if not crops.boxes:
            continue
        pix = ((crops.x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for face in pix:
            images.append(face)
            sources.append(f"{name}#{frame.index}" + (f"@{tag}" if tag else ""))
            if max_per_clip and len(images) >= max_per_clip:
                return np.stack(images), sources
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.stack(images), sources


def _down_up(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)  # fmt: skip
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _brightness(image: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(image.astype(np.float32) * gain, 0, 255).round().astype(np.uint8)


#: Benign changes a frame may get before the daemon sees it, whose faces are clean negatives
#: for calibration: down-and-up scaling (the softness of a small face upscaled to G's side)
#: and exposure. Re-encoding is the other one (:data:`REENCODE_CRF`).
FRAME_BENIGN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scale0.5": lambda im: _down_up(im, 0.5),
    "scale0.3": lambda im: _down_up(im, 0.3),
    "bright0.7": lambda im: _brightness(im, 0.7),
    "bright1.3": lambda im: _brightness(im, 1.3),
}
#: H.264 qualities a clip is re-encoded at (x264's CRF: 23 its default, 35 a heavy stream).
REENCODE_CRF = (23, 35)


def reencode(src: str | Path, dst: Path, crf: int, max_pixels: int) -> Path:
    """Write ``src`` again as H.264 at ``crf`` (every frame, the source's rate): a benign copy."""
    info = media.probe(src)
    writer = media.VideoWriter(dst, info, codec="libx264", crf=crf)
    ok = False
    try:
        for frame in media.decode(src, max_pixels, on_corrupt=lambda pts, err: None):
            writer.write(frame.image, frame.pts)
        ok = True
    finally:
        writer.close(commit=ok)
    return dst


def clip_negatives(
    path: str | Path, cfg: Config | None = None, size: int = 128, every: int = 1,
    max_per_clip: int = 0,
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Clean crops of one clip and of its benign copies, each framed by the daemon's path.

    The copies are :data:`FRAME_BENIGN` and H.264 re-encodes at :data:`REENCODE_CRF`, each
    located and cropped again, as the daemon would see it. ``max_per_clip`` applies to each
    copy. Sources carry ``@copy`` tags.
    """
    cfg = cfg or Config()
    skip = lambda pts, err: None  # noqa: E731 - corrupt packets: the daemon skips them too
    parts = [clip_crops(path, cfg, size, every, max_per_clip, skip)]
    for tag, fn in FRAME_BENIGN.items():
        parts.append(clip_crops(path, cfg, size, every, max_per_clip, skip, process=fn, tag=tag))
    if not media.is_image(path):
        with tempfile.TemporaryDirectory(prefix="magdr-reencode-") as tmp:
            for crf in REENCODE_CRF:
                copy = reencode(path, Path(tmp) / f"crf{crf}.mp4", crf, cfg.guard.max_frame_pixels)
                parts.append(clip_crops(copy, cfg, size, every, max_per_clip, skip,
                                        tag=f"crf{crf}"))  # fmt: skip
    images = [p[0] for p in parts if len(p[0])]
    sources = [s for p in parts for s in p[1]]
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.concatenate(images), sources


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemon.face_crops``: write daemon-framed face crops of clips to an .npz."""
    ap = argparse.ArgumentParser(
        prog="python -m daemon.face_crops", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("clips", nargs="+", metavar="CLIP", help="videos (or images)")
    ap.add_argument("--out", required=True, help="the .npz to write")
    ap.add_argument("--every", type=int, default=1, help="take every Nth frame")
    ap.add_argument("--max-per-clip", type=int, default=0, help="at most M crops a clip (0: all)")
    ap.add_argument("--size", type=int, default=128, help="crop side (the generator's size)")
    ap.add_argument("--config", help="daemon TOML config whose [guard] settings frame the faces")
    ap.add_argument(
        "--benign", action="store_true",
        help="add the crops of each clip's benign copies (scaled, brightened, H.264 re-encoded)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.every < 1 or args.max_per_clip < 0 or args.size < 1:
        ap.error("--every and --size must be >= 1, --max-per-clip >= 0")
    try:
        cfg = load_config(args.config) if args.config else Config()
    except (OSError, ValueError) as e:
        print(f"face_crops: config error: {e}", file=sys.stderr)
        return 2

    all_images: list[np.ndarray] = []
    all_sources: list[str] = []
    for clip in args.clips:
        skipped: list[int | None] = []
        try:
            if args.benign:
                images, sources = clip_negatives(
                    clip, cfg, args.size, args.every, args.max_per_clip
                )
            else:
                images, sources = clip_crops(
                    clip, cfg, args.size, args.every, args.max_per_clip,
                    on_corrupt=lambda pts, err, s=skipped: s.append(pts),
                )  # fmt: skip
        except (media.MediaError, OSError) as e:
            # Nothing is written: a calibration set silently missing a clip is worse than none.
            print(f"face_crops: {clip}: {e}", file=sys.stderr)
            return 1
        frames = len(set(sources))
        note = f", {len(skipped)} corrupt packets skipped" if skipped else ""
        if len(images):
            print(f"{clip}: {len(images)} crops from {frames} frames{note}")
        else:
            print(f"{clip}: no faces found, 0 crops{note}")
        all_images.extend(images)
        all_sources.extend(sources)

    images = (np.stack(all_images) if all_images
              else np.zeros((0, args.size, args.size, 3), np.uint8))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, sources=np.array(all_sources, dtype=str))
    print(f"wrote {out}: {len(images)} crops from {len(args.clips)} clips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """``magdr-guard calibrate``: :func:`magdr.calibrate.main`, plus ``--videos DIR``.

    ``--videos DIR`` frames the faces of every clip in DIR the daemon's way, with their benign
    copies (:func:`clip_negatives`), and hands them to the fit as ``--extra-negatives`` (the
    library does no video I/O). ``--video-every N`` and ``--video-max M`` thin the frames.
    """
    from magdr import calibrate

    ap = argparse.ArgumentParser(prog="magdr-guard calibrate", add_help=False)
    ap.add_argument(
        "--videos",
        default=None,
        metavar="DIR",
        help="clean negatives from every clip in DIR, framed as the daemon frames "
        "faces, with benign copies (scaled, brightened, H.264 at CRF 23 and 35)",
    )
    ap.add_argument(
        "--video-every",
        type=int,
        default=30,
        metavar="N",
        help="every Nth frame of each clip (default %(default)s)",
    )
    ap.add_argument(
        "--video-max",
        type=int,
        default=0,
        metavar="M",
        help="at most M crops per clip and copy (0: all)",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="daemon TOML config whose [guard] settings frame the video faces",
    )
    ours, rest = ap.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(ap.format_help().replace("usage: ", "video options of ", 1))
        return calibrate.main(rest)
    if ours.videos is None:
        return calibrate.main(rest)
    folder = Path(ours.videos)
    clips = sorted(p for p in folder.iterdir() if media.is_media(p)) if folder.is_dir() else []
    if not clips:
        print(f"calibrate: --videos {ours.videos}: no video files there", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="magdr-calibrate-") as tmp:
        npz = Path(tmp) / "video_negatives.npz"
        argv_crops = [
            *map(str, clips),
            "--out",
            str(npz),
            "--benign",
            "--every",
            str(ours.video_every),
            "--max-per-clip",
            str(ours.video_max),
        ]
        if ours.config:  # fmt: skip
            argv_crops += ["--config", ours.config]
        rc = main(argv_crops)
        if rc:
            return rc
        return calibrate.main([*rest, "--extra-negatives", str(npz)])
