"""A contact sheet of ``magdr-guard demo``'s cleaned frames: ``bench/results/demo_frames.png``.

::

    python -m bench.demo_frames                       # runs the demo in a temp dir (~4 min, CPU)
    python -m bench.demo_frames --demo-dir DIR        # a finished `magdr-guard demo --out DIR`
    python -m bench.demo_frames --report bench/results/REPORT.md   # and its "Demo frames" section

One row per frame the demo attacked (its ``*.report.jsonl``), four columns: the bundled clip's
frame; G's own pixels pasted back the way the daemon did before 2026-12 (``edit_lowpass = 0``,
``paste_mask = "square"``: the default G's checkerboard and the crop's square on this face); the
demo's cleaned output of the clean clip; the demo's cleaned output of the PGD-disrupted copy.
Under each pasted frame, measured against the clip's frame (:func:`bench.pipeline.paste_quality`):
the *seam* along the crop's square border (0 = untouched) and the share of the input's
high-frequency detail kept in the eyes-to-mouth area, which the hair edit does not target. The
clip is MIT-licensed, so the sheet may be committed.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon import media

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    "clip frame",
    "G's pixels, square (before)",
    "cleaned, clean clip",
    "cleaned, disrupted copy",
)


def attacked_frames(demo_dir: Path) -> list[int]:
    """Indices of the frames the demo attacked, from its attack report."""
    (report,) = demo_dir.glob("*.report.jsonl")
    return [json.loads(line)["frame"] for line in report.read_text().splitlines() if line]


def _frames(path: Path, want: set[int]) -> dict[int, np.ndarray]:
    return {f.index: f.image for f in media.decode(path, 1 << 26) if f.index in want}


def g_pixels(frames: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each frame with G's own output pasted back (no guard, ``edit_lowpass = 0``)."""
    import torch

    from daemon.config import load_config
    from daemon.engine import Engine

    cfg = load_config(ROOT / "config" / "default.toml")
    cfg.guard.enabled, cfg.guard.edit_lowpass, cfg.guard.paste_mask = False, 0.0, "square"
    engine = Engine(cfg)
    out = {}
    for i, frame in frames.items():
        crops = engine.find_faces(frame)
        if len(crops.x) == 0:
            out[i] = frame
            continue
        c = engine.default_cond.expand(len(crops.x), -1)
        with torch.no_grad():
            faces, _ = engine.guard_faces(crops.x, c)
        out[i] = engine.paste(frame, faces, crops)
    return out


@functools.cache
def _framing() -> Any:
    """The daemon's face path with the documented defaults (its detector loaded once)."""
    from daemon.config import Config
    from daemon.framing import Framing

    return Framing(Config(), 128)


def measures(frame: np.ndarray, pasted: np.ndarray) -> str:
    """``seam S, detail D%`` of ``pasted`` against ``frame`` (its faces found afresh)."""
    from bench.pipeline import paste_quality

    framing = _framing()
    boxes = framing.locate(frame)
    crops = framing.crop(frame, boxes)
    if not boxes or crops.matrices is None:
        return "no face"
    seams, kept = paste_quality(frame, pasted, crops, boxes, 128)
    return f"seam {np.mean(seams):.3f}, detail {100 * np.mean(kept):.0f}%"


def sheet(
    rows: list[list[np.ndarray]], side: int = 256, notes: list[list[str]] | None = None
) -> np.ndarray:
    """RGB rows of frames as one image, each frame resized to ``side`` px high, titled columns;
    ``notes[r][c]``, when given, is written under cell ``c`` of row ``r``."""
    title_h = 28
    cells = [[cv2.resize(f, (round(f.shape[1] * side / f.shape[0]), side)) for f in r]
             for r in rows]  # fmt: skip
    for r, row_notes in enumerate(notes or []):
        for c, note in enumerate(row_notes):
            if note:
                cell = cells[r][c] = cells[r][c].copy()
                cv2.rectangle(cell, (0, side - 22), (cell.shape[1], side), (255, 255, 255), -1)
                cv2.putText(cell, note, (6, side - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                            (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    body = np.concatenate([np.concatenate(r, 1) for r in cells], 0)
    head = np.full((title_h, body.shape[1], 3), 255, np.uint8)
    x = 0
    for name, cell in zip(COLUMNS, cells[0], strict=False):
        cv2.putText(head, name, (x + 6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)  # fmt: skip
        x += cell.shape[1]
    return np.concatenate([head, body], 0)


def render(demo_dir: Path, clip: Path, out: Path) -> Path:
    """The sheet of a finished demo in ``demo_dir`` (``clip``: the bundled clip) to ``out``."""
    want = set(attacked_frames(demo_dir))
    outbox = demo_dir / "outbox"
    src = _frames(clip, want)
    clean = _frames(outbox / clip.name, want)
    (adv_path,) = [p for p in outbox.iterdir() if ".adv." in p.name and p.suffix == ".mkv"]
    adv = _frames(adv_path, want)
    plain = g_pixels(src)
    rows = [[src[i], plain[i], clean[i], adv[i]] for i in sorted(want)]
    notes = [[""] + [measures(r[0], pasted) for pasted in r[1:]] for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), sheet(rows, notes=notes)[..., ::-1])
    return out


def main(argv: Sequence[str] | None = None) -> int:  # noqa: D103
    ap = argparse.ArgumentParser(prog="python -m bench.demo_frames", description=__doc__)
    ap.add_argument("--demo-dir", type=Path, help="a finished `magdr-guard demo --out DIR`")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_frames.png")
    ap.add_argument("--report", type=Path, help="put a 'Demo frames' section into this report")
    a = ap.parse_args(argv)
    from daemon.cli import DEMO_CLIP
    from daemon.cli import main as cli

    demo_dir = a.demo_dir
    if demo_dir is None:
        demo_dir = Path(tempfile.mkdtemp(prefix="magdr-demo-frames-"))
        if cli(["demo", "--out", str(demo_dir)]) != 0:
            return 1
    print(render(demo_dir, DEMO_CLIP, a.out))
    if a.report is not None:
        from bench.report import put_section
        from bench.run_info import commit

        rel = Path(a.out).resolve().relative_to(a.report.resolve().parent)
        put_section(a.report, "## Demo frames", "\n".join([
            "## Demo frames", "",
            "`magdr-guard demo` (the bundled MIT clip and a PGD-disrupted copy through the "
            "daemon, `config/default.toml`), then `python -m bench.demo_frames` at commit "
            f"`{commit()}`: "
            "per attacked frame, left to right: " + " | ".join(COLUMNS)
            + " (the daemon adds the edit, low-passed, inside the regions it targets; G's own "
            "pixels in a square carry its checkerboard and wash out the face's detail). Under "
            "each pasted frame: the seam along the crop's square border (0 = untouched) and the "
            "share of the input's high-frequency detail kept between the eyes and the mouth.",
            "", f"![{rel}]({rel})",
        ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
