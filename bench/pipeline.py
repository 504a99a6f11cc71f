"""The "Pipeline" section of ``bench/results/REPORT.md``: the daemon's speed on real video.

Per clip of ``$MAGDR_DATA/videos`` at 720p or more (or the clips given), in one run on one
machine, so that every ratio compares numbers taken minutes apart::

    python -m bench.pipeline --report bench/results/REPORT.md --json bench/results/pipeline.json

- **the floor**: ``ffmpeg -threads 2 -i CLIP -c:v libx264 -preset veryfast -crf 18`` (decode and
  re-encode), its wall time as frames/s;
- **the daemon**: ``magdr-guard process CLIP`` in a fresh process with the documented defaults,
  guard on and off: frames/s from its summary (the steady state, as a long-running daemon
  sees it) and the command's wall time with start-up; each beside the floor as a ratio;
- **stages**: ms per frame of each stage run alone in this process on the first
  ``--stage-frames`` frames (decode, locate, align, guard in batches of ``[guard] batch_size``,
  paste, encode): where the time goes, not what the overlapped pipeline takes;
- **tracking**: ``detect_every`` 1 against ``--follow-every``: locate ms/frame, landmark jitter
  (mean second difference of the five points, % of the eye distance), clean faces flagged;
- **paste**: on every ``--quality-every``-th frame, the published frame against the input with
  ``paste_mask`` "region" (the default) and "square" (before): the *seam*, the gradient of what
  the paste changed along the crop's square border over the face's own gradient (0: untouched),
  and the *detail kept*, the mean
  absolute Laplacian of the output over the input's in the eyes-to-mouth area, which a hair
  edit does not target (1.00: all of the input's high frequencies kept);
- **live** (``--live``): ``magdr-guard run`` with a ZeroMQ SUB source (the documented queue and
  drop policy) fed the clip as JPEG at its own frame rate, looped for ``--live-seconds``,
  verdicts on a PUB sink: the share of sent frames that got a verdict, and send-to-verdict
  latency p50/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from daemon import media
from daemon.config import Config

ROOT = Path(__file__).resolve().parents[1]
FFMPEG = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18"]


def _clips(given: Sequence[str], min_side: int) -> list[Path]:
    from magdr.celeba import data_root

    if given:
        return [Path(c) for c in given]
    found = sorted((data_root() / "videos").glob("*.mp4"))
    return [c for c in found if min(media.probe(c).width, media.probe(c).height) >= min_side]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NOTIFY_SOCKET", None)
    return env


def ffmpeg_fps(clip: Path, tmp: Path, threads: int = 2) -> dict[str, float]:
    """The transcode floor: ffmpeg decoding and re-encoding ``clip`` (libx264 veryfast crf 18)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise SystemExit("ffmpeg not found: apt-get install ffmpeg")
    frames = sum(1 for _ in media.decode(clip, 1 << 40))
    t0 = time.monotonic()
    subprocess.run([exe, "-v", "error", "-y", "-threads", str(threads), "-i", str(clip), *FFMPEG,
                    str(tmp / f"ffmpeg-{clip.stem}.mp4")], check=True)  # fmt: skip
    wall = time.monotonic() - t0
    return {"frames": frames, "wall_s": wall, "fps": frames / wall}


def process_fps(clip: Path, out: Path, guard: bool) -> dict[str, Any]:
    """``magdr-guard process CLIP`` in a fresh process with the documented defaults."""
    cmd = [sys.executable, "-m", "daemon", "process", str(clip), "--out", str(out),
           "--no-progress"]  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(cmd + ([] if guard else ["--no-guard"]), check=True, capture_output=True,
                   env=_env())  # fmt: skip
    wall = time.monotonic() - t0
    s = json.loads(next(out.glob("*.summary.json")).read_text())
    return {"fps": s["fps"], "wall_s": wall, "frames": s["frames"], "faces": s["faces"],
            "disrupted_faces": s["disrupted_faces"], "encoder": s.get("encoder")}  # fmt: skip


def _ms(t: float, n: int) -> float:
    return 1000 * t / max(n, 1)


def _frames(clip: Path, n: int, every: int = 1) -> list[media.Frame]:
    out = []
    for f in media.decode(clip, 1 << 40):
        if n and f.index >= n:
            break
        if f.index % every == 0:
            out.append(f)
    return out


def stages(engine: Any, clip: Path, n: int, tmp: Path) -> dict[str, float]:
    """ms per frame of each stage alone on the first ``n`` frames, as the daemon runs them."""
    g = engine.cfg.guard
    t0 = time.perf_counter()
    frames = _frames(clip, n)
    k = len(frames)
    out: dict[str, float] = {"frames": k, "decode": _ms(time.perf_counter() - t0, k)}
    stream = f"stages-{clip.stem}"
    t0 = time.perf_counter()
    boxes = [engine.framing.locate(f.image, stream) for f in frames]
    out["locate"] = _ms(time.perf_counter() - t0, k)
    t0 = time.perf_counter()
    crops = [engine.framing.crop(f.image, b) for f, b in zip(frames, boxes, strict=True)]
    out["align"] = _ms(time.perf_counter() - t0, k)
    x = torch.cat([c.x for c in crops])
    out["faces"] = len(x)
    t0 = time.perf_counter()
    faces = []
    for i in range(0, len(x), g.batch_size):
        xb = x[i : i + g.batch_size]
        faces.append(engine.guard_faces(xb, engine.default_cond[None].expand(len(xb), -1))[0])
    out["guard"] = _ms(time.perf_counter() - t0, k)
    guarded = torch.cat(faces).split([len(c.boxes) for c in crops])
    t0 = time.perf_counter()
    pasted = [
        engine.paste(f.image, y, c, stream=stream)
        for f, y, c in zip(frames, guarded, crops, strict=True)
    ]
    out["paste"] = _ms(time.perf_counter() - t0, k)
    w = media.VideoWriter(tmp / f"stages-{clip.stem}.mp4", media.probe(clip))
    t0 = time.perf_counter()
    for f, image in zip(frames, pasted, strict=True):
        w.write(image, f.pts)
    w.close()
    out["encode"] = _ms(time.perf_counter() - t0, k)
    return out


def _eye_distance(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[1] - points[0]))


def tracking(engine: Any, clip: Path, n: int, follow_every: int) -> dict[str, Any]:
    """Full detection on every frame against following between detections."""
    from magdr.faces.track import FaceFollower

    g = engine.cfg.guard
    frames = _frames(clip, n)
    out: dict[str, Any] = {}
    for every in (1, follow_every):
        f = FaceFollower(engine.framing.detect, every=every, min_size=g.min_face,
                         max_faces=g.max_faces, max_side=g.detect_side,
                         smooth=g.smooth_landmarks)  # fmt: skip
        t0 = time.perf_counter()
        boxes = [f(fr.image) for fr in frames]
        ms = _ms(time.perf_counter() - t0, len(frames))
        # jitter: the largest face's landmarks, second difference over three frames in a row
        pts = [b[0].points if b and b[0].points is not None else None for b in boxes]
        jit = [np.abs(a - 2 * b + c).mean() / _eye_distance(b)
               for a, b, c in zip(pts, pts[1:], pts[2:], strict=False)
               if a is not None and b is not None and c is not None]  # fmt: skip
        crops = [engine.framing.crop(fr.image, b) for fr, b in zip(frames, boxes, strict=True)]
        x = torch.cat([c.x for c in crops])
        flagged = 0
        with torch.inference_mode():
            for i in range(0, len(x), 16):
                xb = x[i : i + 16]
                cond = engine.default_cond[None].expand(len(xb), -1)
                flagged += int(engine.guard.detect(xb, cond).disrupted.sum())
        out[f"every_{every}"] = {
            "locate_ms": ms, "jitter_pct": 100 * float(np.mean(jit)) if jit else None,
            "faces": len(x), "missed_frames": sum(not b for b in boxes), "flagged": flagged,
            "detections": f.stats.detections, "followed": f.stats.followed, "lost": f.stats.lost,
        }  # fmt: skip
    return out


def _ring(shape: tuple[int, ...], matrix: np.ndarray, size: int, band: float = 0.1) -> np.ndarray:
    """The band along the crop's square border, ``band`` of its side deep, in frame pixels.

    A square paste fades in over a feather inside its border; its seam lies in this band.
    """
    inv = cv2.invertAffineTransform(matrix)

    def square(margin: float) -> np.ndarray:
        a, b = margin * size, (1 - margin) * size
        corners = np.array([[a, a], [b, a], [b, b], [a, b]], np.float64)
        return (corners @ inv[:, :2].T + inv[:, 2]).round().astype(np.int32)

    ring = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(ring, square(0.0), 1)
    cv2.fillConvexPoly(ring, square(band), 0)
    return ring.astype(bool)


def _eyes_to_mouth(shape: tuple[int, ...], points: np.ndarray) -> np.ndarray:
    """The hull of the eyes and mouth corners, grown by a fifth of the eye distance."""
    hull = points[[0, 1, 4, 3]].astype(np.float64)  # eyes, mouth corners (YuNet's order)
    centre = hull.mean(0)
    grown = centre + (hull - centre) * 1.0 + np.sign(hull - centre) * 0.2 * _eye_distance(points)
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, grown.round().astype(np.int32), 1)
    return mask.astype(bool)


def _grad(gray: np.ndarray) -> np.ndarray:
    return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))


def _lap(gray: np.ndarray) -> np.ndarray:
    return np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))


def paste_quality(
    frame: np.ndarray, out: np.ndarray, crops: Any, boxes: list[Any], size: int
) -> tuple[list[float], list[float]]:
    """Per face: the seam and the detail kept (see the module docstring).

    seam: the gradient of what the paste changed, ``|∇(out − frame)|``, in the band along the
    crop's square border (:func:`_ring`), over the input's own gradient ``|∇frame|`` inside the
    face (eyes to mouth): 0 when the border is untouched, larger the more a square shows.
    """
    g_in = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    g_out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grad_in, grad_delta = _grad(g_in), _grad(g_out - g_in)
    lap_in, lap_out = _lap(g_in), _lap(g_out)
    seams, kept = [], []
    for m, b in zip(crops.matrices, boxes, strict=True):
        ring, inner = _ring(frame.shape, m, size), _eyes_to_mouth(frame.shape, b.points)
        if not inner.any():
            continue
        if ring.any():
            seams.append(float(grad_delta[ring].mean() / max(grad_in[inner].mean(), 1e-6)))
        kept.append(float(lap_out[inner].mean() / max(lap_in[inner].mean(), 1e-6)))
    return seams, kept


def quality(engine: Any, clip: Path, every: int) -> dict[str, Any]:
    """Seam and detail kept of the published frames, ``paste_mask`` region against square."""
    g = engine.cfg.guard
    frames = _frames(clip, 0, every)
    out: dict[str, Any] = {"frames": len(frames)}
    saved = g.paste_mask
    try:
        for mask in ("region", "square"):
            g.paste_mask = mask
            seams: list[float] = []
            kept: list[float] = []
            for f in frames:
                boxes = engine.framing.locate(f.image)
                crops = engine.framing.crop(f.image, boxes)
                if not boxes or crops.matrices is None:
                    continue
                y, _ = engine.guard_faces(crops.x, engine.default_cond[None].expand(len(boxes), -1))
                s, k = paste_quality(f.image, engine.paste(f.image, y, crops), crops, boxes,
                                     engine.size)  # fmt: skip
                seams += s
                kept += k
            out[mask] = {"faces": len(kept), "seam": float(np.mean(seams)) if seams else None,
                         "detail_kept": float(np.mean(kept)) if kept else None,
                         "detail_kept_min": float(np.min(kept)) if kept else None}  # fmt: skip
    finally:
        g.paste_mask = saved
    return out


def live(clip: Path, tmp: Path, seconds: float = 30.0, fmt: str = "jpeg") -> dict[str, Any]:
    """``magdr-guard run`` fed ``clip`` at its frame rate on ZeroMQ: share guarded, latency.

    The clip is sent over and over for ``seconds`` (the steady state, not a queue's backlog
    drained after a short clip), one sequence number per frame sent.
    """
    import zmq

    from bench.soak import _port
    from daemon import wire

    info = media.probe(clip)
    rate = float(info.rate or 30)
    frames = _frames(clip, 0)
    images = [wire.encode_image(f.image, fmt) for f in frames]
    h, w = frames[0].image.shape[:2]
    port_in, port_out = _port(), _port()
    cfg = tmp / f"live-{clip.stem}.toml"
    cfg.write_text(f"""
[logging]
format = "json"

[daemon]
work_dir = "{tmp / f"live-{clip.stem}-state"}"
watchdog = false

[[sources]]
kind = "zmq"
endpoint = "tcp://127.0.0.1:{port_in}"
socket = "sub"
bind = true

[[sinks]]
kind = "zmq"
endpoint = "tcp://127.0.0.1:{port_out}"
frames = false
hwm = 0
""")
    daemon_log = tmp / f"live-{clip.stem}.jsonl"
    with open(daemon_log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(cfg)],
                                stdout=logf, stderr=subprocess.STDOUT, env=_env())  # fmt: skip
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict.")
    arrived: dict[tuple[str, int], float] = {}
    listening = threading.Event()
    listening.set()

    def listen() -> None:
        while listening.is_set():
            if sub.poll(50):
                v = json.loads(sub.recv_multipart()[1])
                arrived[v["stream"], v["seq"]] = time.monotonic()

    try:
        deadline = time.monotonic() + 180
        while b'"ready"' not in daemon_log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start:\n" + daemon_log.read_text()[-3000:])
            time.sleep(0.1)
        pub.connect(f"tcp://127.0.0.1:{port_in}")
        sub.connect(f"tcp://127.0.0.1:{port_out}")
        threading.Thread(target=listen, daemon=True).start()
        # warm-up on a stream of its own until verdicts flow (connections, first batch)
        for i in range(600):
            pub.send_multipart(wire.encode_frame("warm", i, np.zeros((64, 64, 3), np.uint8), fmt))
            time.sleep(0.05)
            if any(k[0] == "warm" for k in list(arrived)):
                break
        sent: dict[int, float] = {}
        t0 = time.monotonic()
        for i in range(round(seconds * rate)):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            header = {"v": 1, "stream": "live", "seq": i, "format": fmt, "width": w, "height": h}
            sent[i] = time.monotonic()
            pub.send_multipart([b"frame.live", json.dumps(header).encode(),
                                images[i % len(images)]])  # fmt: skip
        quiet = time.monotonic()
        n = 0
        while time.monotonic() - quiet < 5:
            time.sleep(0.1)
            got = sum(k[0] == "live" for k in list(arrived))
            if got != n:
                n, quiet = got, time.monotonic()
    finally:
        listening.clear()
        proc.terminate()
        proc.wait(60)
        pub.close(0)
        sub.close(0)
        ctx.term()
    lat = [1000 * (arrived["live", i] - t) for i, t in sent.items() if ("live", i) in arrived]
    return {"sent": len(sent), "guarded": len(lat), "share": len(lat) / max(len(sent), 1),
            "rate": rate, "format": fmt,
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
            "latency_ms_p99": float(np.percentile(lat, 99)) if lat else None}  # fmt: skip


def section(rows: list[dict[str, Any]], command: str, meta: dict[str, Any]) -> str:
    """The report's "Pipeline" section."""
    lines = [
        "## Pipeline",
        "",
        f"`{command}` — commit `{meta['commit']}`, {meta['machine']}, {meta['date']}; "
        f"each clip's numbers taken in one pass, the floor first.",
        "",
        "| clip | frames | ffmpeg fps (floor) | process fps guard on | × floor | wall s (with "
        "start-up) | guard off fps | × floor | faces flagged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ff, on, off = r["ffmpeg"], r["process"]["on"], r["process"]["off"]
        lines.append(
            f"| {r['clip']} ({r['size']}) | {ff['frames']} | {ff['fps']:.1f} | {on['fps']:.1f} | "
            f"{ff['fps'] / on['fps']:.2f} | {on['wall_s']:.1f} (ffmpeg {ff['wall_s']:.1f}) | "
            f"{off['fps']:.1f} | {ff['fps'] / off['fps']:.2f} | "
            f"{on['disrupted_faces']}/{on['faces']} |"
        )
    lines += ["", "Stages alone, ms per frame (one face a frame; guard in batches of "
              "`[guard] batch_size`):", "",
              "| clip | decode | locate | align | guard | paste | encode | sum |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    keys = ("decode", "locate", "align", "guard", "paste", "encode")
    for r in rows:
        st = r["stages"]
        lines.append(
            f"| {r['clip']} | "
            + " | ".join(f"{st[k]:.1f}" for k in keys)
            + f" | {sum(st[k] for k in keys):.1f} |"
        )
    lines += ["", "Tracking: full detection every frame against following in between:", "",
              "| clip | detect every | locate ms/frame | landmark jitter (% eye distance) | "
              "frames without a face | clean faces flagged | detections / followed / lost |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        for k, t in r["tracking"].items():
            jit = "–" if t["jitter_pct"] is None else f"{t['jitter_pct']:.2f}"
            lines.append(
                f"| {r['clip']} | {k.removeprefix('every_')} | {t['locate_ms']:.1f} | "
                f"{jit} | {t['missed_frames']} | {t['flagged']}/{t['faces']} | "
                f"{t['detections']} / {t['followed']} / {t['lost']} |"
            )
    lines += [
        "",
        "Paste-back (seam: gradient of the change along the crop's square border over "
        "the face's own gradient, 0 = untouched; detail kept: mean |Laplacian| in the "
        "eyes-to-mouth area, output over input, 1.00 = all):",
        "",
        "| clip | faces | seam, region mask | seam, square (before) | detail kept, region "
        "(min) | detail kept, square |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        q = r["quality"]
        if q["region"]["faces"]:
            lines.append(
                f"| {r['clip']} | {q['region']['faces']} | {q['region']['seam']:.3f} | "
                f"{q['square']['seam']:.3f} | {q['region']['detail_kept']:.2f} "
                f"({q['region']['detail_kept_min']:.2f}) | {q['square']['detail_kept']:.2f} |"
            )
    lived = [r for r in rows if r.get("live")]
    if lived:
        lines += ["", "Live: `magdr-guard run`, a ZeroMQ SUB source (default queue 32, "
                  "drop-oldest) fed the clip as JPEG at its own rate, looped:", "",
                  "| clip | rate | frames sent | guarded | latency p50 ms | p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in lived:
            lv = r["live"]
            lines.append(
                f"| {r['clip']} | {lv['rate']:.0f} | {lv['sent']} | "
                f"{100 * lv['share']:.0f}% | {lv['latency_ms_p50']:.0f} | "
                f"{lv['latency_ms_p99']:.0f} |"
            )
    lines += ["", meta["gpu_note"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.pipeline``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("clips", nargs="*", help="default: shared clips of 720p or more")
    ap.add_argument("--min-side", type=int, default=720, help="default clips' shorter side")
    ap.add_argument("--stage-frames", type=int, default=60)
    ap.add_argument("--follow-every", type=int, default=5)
    ap.add_argument("--track-frames", type=int, default=90)
    ap.add_argument("--quality-every", type=int, default=30)
    ap.add_argument("--live", action="store_true", help="also the live ZeroMQ stream")
    ap.add_argument("--live-seconds", type=float, default=30.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, help="write '## Pipeline' of REPORT.md")
    a = ap.parse_args(argv)
    from bench.run_info import commit, machine
    from daemon.engine import Engine

    engine = Engine(Config())
    rows = []
    with tempfile.TemporaryDirectory(prefix="magdr-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        for clip in _clips(a.clips, a.min_side):
            info = media.probe(clip)
            row: dict[str, Any] = {"clip": clip.name, "size": f"{info.width}x{info.height}"}
            row["ffmpeg"] = ffmpeg_fps(clip, tmp)
            row["process"] = {
                ("on" if on else "off"): process_fps(clip, tmp / f"{clip.stem}-{on}", on)
                for on in (True, False)
            }
            row["stages"] = stages(engine, clip, a.stage_frames, tmp)
            row["tracking"] = tracking(engine, clip, a.track_frames, a.follow_every)
            row["quality"] = quality(engine, clip, a.quality_every)
            if a.live:
                row["live"] = live(clip, tmp, a.live_seconds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    cuda = torch.cuda.is_available()
    meta = {"commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPU cores, {machine(engine.device)['cpu']}, "
                       f"G and parser in {str(engine.dtype).removeprefix('torch.')}",
            "gpu_note": "Measured on the CPU: no GPU was lent to this run." if not cuda
            else f"GPU: {torch.cuda.get_device_name()}."}  # fmt: skip
    command = "python -m bench.pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "clips": rows}, indent=1))
    text = section(rows, command.strip(), meta)
    print(text)
    if a.report:
        from bench.report import put_section

        put_section(a.report, "## Pipeline", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
