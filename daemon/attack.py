"""``magdr-guard attack``: disrupted copies of files, attacked through the daemon's own crop.

A red-team copy is only worth something if the perturbation is still there when the daemon
cuts the face out of the attacked frame again. PGD and I-FGSM therefore perturb the frame's
pixels through a differentiable copy of the daemon's framing, with Expectation over the small
moves of re-detected landmarks (:class:`magdr.faces.warp_attack.FramePGD`); C&W and the adaptive
attack still perturb the crop and paste the change back (inverse warp or resize).

Every attacked frame is then checked the daemon's way: the frame as written (``uint8``), faces
found again with :meth:`daemon.engine.Engine.find_faces`, G on those crops against G on the
clean frame's, matched by box overlap. A face still disrupts G when the MSE exceeds
:data:`magdr.attacks.SUCCESS_MSE` (Ruiz et al.'s 0.05). One JSON line per attacked frame goes
to the report; the written file is decoded again to prove the write was lossless.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.config import Config
from daemon.tracks import iou

if TYPE_CHECKING:
    import torch

    from daemon.engine import Engine
    from daemon.framing import Crops

#: Box overlap (IoU) above which a face found on the attacked frame is the clean frame's face.
MATCH_IOU = 0.3

#: EoT jitter ``(shift_px, scale, roll_deg)`` of a Haar box crop (no landmarks): the cascade's
#: boxes move more than landmarks (its scale pyramid steps by 10%) and never roll.
BOX_JITTER = (3.0, 0.05, 0.0)

#: Methods attacked through the frame path; the others perturb the crop.
FRAME_METHODS = ("pgd", "ifgsm")


@dataclass
class AttackReport:
    """What ``attack_file`` did: faces attacked, and how many the daemon's crop left disrupting.

    ``lost`` faces were not found again on the attacked frame (counted as not disrupting).
    ``flagged``: of the disrupting faces, how many the guard flags on that crop (``None``
    when the configuration runs without a guard).
    """

    attacked: int = 0
    disrupting: int = 0
    lost: int = 0
    flagged: int | None = None
    frames: int = 0
    lossless: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Fraction of attacked faces that still disrupt G after the daemon's crop."""
        return self.disrupting / self.attacked if self.attacked else 0.0

    def summary(self) -> str:
        """One line for the console."""
        guard = "" if self.flagged is None else f", {self.flagged} of them flagged by the guard"
        return (
            f"{self.attacked} faces attacked, {self.disrupting} still disrupt G after the "
            f"daemon's crop ({100 * self.rate:.0f}%; {self.lost} not found again){guard}"
        )


def attack_name(src: Path) -> str:
    """``clip.mp4`` -> ``clip.adv.mkv`` (lossless container), ``face.jpg`` -> ``face.adv.png``."""
    return f"{src.stem}.adv{'.png' if src.suffix.lower() in ('.jpg', '.jpeg', '.png') else '.mkv'}"


def report_name(dst: Path) -> Path:
    """``clip.adv.mkv`` -> ``clip.adv.mkv.report.jsonl``, beside it."""
    return dst.with_name(dst.name + ".report.jsonl")


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    pix = ((frame.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return np.ascontiguousarray(pix.permute(1, 2, 0).numpy())


def framing(engine: Engine, crops: Crops) -> tuple[str, np.ndarray, tuple[float, float, float]]:
    """How the daemon cut these faces: ``(mode, matrices, jitter)`` for ``FramePGD``."""
    from magdr.faces.warp_attack import JITTER, rect_matrices

    if crops.matrices is not None:
        return "warp", crops.matrices, JITTER
    mats = rect_matrices(crops.rects, engine.size)
    if engine.cfg.guard.faces == "frame":  # no detector in the loop: the framing cannot move
        return "resize", mats, (0.0, 0.0, 0.0)
    return "resize", mats, BOX_JITTER


def _drift(m: np.ndarray, m2: np.ndarray, size: int) -> float:
    """How far (crop pixels) the new framing ``m2`` moves the crop's corners under ``m``."""
    from magdr.faces.align import _corners, _invert

    seen = _corners(_invert(m2), size, size)
    back = seen @ m[:, :2].T + m[:, 2]
    return float(np.abs(back - _corners(np.eye(2, 3), size, size)).max())


class Attacker:
    """Attack frames and check them through the daemon's path; one per file.

    Args:
        engine: the daemon's engine (its G, its ``find_faces``).
        method: ``pgd`` | ``ifgsm`` | ``cw`` | ``adaptive``.
        eps: L∞ radius in [-1, 1] units; step ``eps / 5``.
        steps: iterations.
        seed: random start and EoT draws.
        eot: framings sampled per step and face (frame path).
        through_frame: PGD and I-FGSM through the daemon's framing; False: on the crop, the
            change pasted back (the path every method took before; what the demo shows).
    """

    def __init__(
        self, engine: Engine, method: str, eps: float, steps: int, seed: int, eot: int,
        through_frame: bool = True,
    ) -> None:  # fmt: skip
        import torch

        if method not in (*FRAME_METHODS, "cw", "adaptive"):
            raise ValueError(f"method: expected pgd|ifgsm|cw|adaptive, got {method!r}")
        self.engine, self.method = engine, method
        self.eps, self.steps, self.eot = eps, steps, eot
        self.through_frame = through_frame
        self.gen = torch.Generator().manual_seed(seed)  # CPU: the EoT draws are numpy's
        self.report = AttackReport()

    def _cond(self, n: int) -> torch.Tensor:
        e = self.engine
        return e.default_cond.to(e.device)[None].expand(n, -1)

    def frame(self, image: np.ndarray, index: int) -> np.ndarray:
        """The attacked ``uint8`` frame (``image`` itself when it has no face); checks it."""
        import torch

        e = self.engine
        crops = e.find_faces(image)
        if not crops.boxes:
            return image
        x, c = crops.x.to(e.device), self._cond(len(crops.boxes))
        with torch.no_grad():
            r = e.G(x, c)
        mode, mats, jitter = framing(e, crops)
        if self.through_frame and self.method in FRAME_METHODS:
            from magdr.faces.warp_attack import FramePGD

            attack = FramePGD(e.G, e.size, eps=self.eps, step=self.eps / 5, steps=self.steps,
                              eot=self.eot, jitter=jitter, mode=mode,
                              random_start=self.method == "pgd")  # fmt: skip
            adv = attack(_to_tensor(image).to(e.device), mats, c, reference=r, generator=self.gen)
            out = _to_uint8(adv)
        else:
            out = self._paste(image, crops, x, c)
        self._check(index, out, crops, mode, mats, r)
        return out

    def _paste(
        self, image: np.ndarray, crops: Crops, x: torch.Tensor, c: torch.Tensor
    ) -> np.ndarray:
        """Attack the crop and paste the change back.

        C&W and adaptive PGD always; PGD and I-FGSM with ``through_frame`` off.
        """
        import cv2

        from magdr import attacks

        G, eps, steps = self.engine.G, self.eps, self.steps
        if self.method == "cw":
            x_adv = attacks.cw_l2(G, x, c, steps=max(steps, 10))
        elif self.method == "pgd":
            x_adv = attacks.pgd(G, x, c, eps=eps, step=eps / 5, steps=steps, generator=self.gen)
        elif self.method == "ifgsm":
            x_adv = attacks.ifgsm(G, x, c, eps=eps, step=eps / 5, steps=steps)
        else:
            x_adv = attacks.adaptive_pgd(
                G, x, c, eps=eps, step=eps / 5, steps=steps, generator=self.gen
            )
        delta = (x_adv - x).cpu().permute(0, 2, 3, 1).numpy() * 127.5
        out = image.astype(np.float32)
        h, w = image.shape[:2]
        if crops.matrices is not None:  # aligned crops: the inverse warp puts δ back
            from magdr.faces.align import unwarp

            for d, m in zip(delta, crops.matrices, strict=True):
                back = unwarp(np.ascontiguousarray(d, np.float32), m, (h, w))
                if back is not None:
                    out[back[0]] += back[1]
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        for d, (x0, y0, rw, rh) in zip(delta, crops.rects, strict=True):
            big = cv2.resize(d, (int(rw), int(rh)), interpolation=cv2.INTER_LINEAR)
            fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + rw, w), min(y0 + rh, h)
            if fx1 > fx0 and fy1 > fy0:
                out[fy0:fy1, fx0:fx1] += big[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _check(
        self,
        index: int,
        out: np.ndarray,
        crops: Crops,
        mode: str,
        mats: np.ndarray,
        r: torch.Tensor,
    ) -> None:
        """Find the faces of the attacked frame again, as the daemon will, and compare G."""
        import torch

        from magdr.attacks import SUCCESS_MSE
        from magdr.faces.warp_attack import resize_crop, round_uint8, warp_crop

        e = self.engine
        again = e.find_faces(out)
        _, mats2, _ = framing(e, again) if again.boxes else ("", np.zeros((0, 2, 3)), None)
        cut = warp_crop if mode == "warp" else resize_crop
        fixed = round_uint8(torch.stack([cut(_to_tensor(out), m, e.size) for m in mats]))
        with torch.no_grad():
            y_fixed = e.G(fixed.to(e.device), self._cond(len(mats)))
            y = e.G(again.x.to(e.device), self._cond(len(again.boxes))) if again.boxes else None
        # The guard's verdict on the crops the daemon will see (what a red team wants to know).
        verdicts = None
        if e.guard is not None and again.boxes:
            x_again = again.x.to(e.device)
            verdicts = e.guard.detect(x_again, self._cond(len(again.boxes))).disrupted.tolist()
        mse, mse_fixed, drift, flagged = [], [], [], []
        for i, box in enumerate(crops.boxes):
            mse_fixed.append(round(float((y_fixed[i] - r[i]).pow(2).mean()), 5))
            ious = [iou(box, b) for b in again.boxes]
            j = int(np.argmax(ious)) if ious else -1
            if j < 0 or ious[j] < MATCH_IOU:
                mse.append(None)
                drift.append(None)
                flagged.append(None)
                continue
            assert y is not None
            mse.append(round(float((y[j] - r[i]).pow(2).mean()), 5))
            drift.append(round(_drift(mats[i], mats2[j], e.size), 2))
            flagged.append(None if verdicts is None else verdicts[j])
        n = len(crops.boxes)
        hits = [m is not None and m > SUCCESS_MSE for m in mse]
        lost = mse.count(None)
        rep = self.report
        rep.attacked, rep.disrupting, rep.lost, rep.frames = (
            rep.attacked + n, rep.disrupting + sum(hits), rep.lost + lost, rep.frames + 1
        )  # fmt: skip
        if e.guard is not None:
            rep.flagged = (rep.flagged or 0) + sum(
                bool(f) for f, h in zip(flagged, hits, strict=True) if h
            )
        rep.rows.append({
            "frame": index, "faces": n, "disrupting": sum(hits), "lost": lost,
            "boxes": crops.boxes, "mse": mse, "mse_same_crop": mse_fixed, "drift_px": drift,
            "flagged": flagged, "crc32": zlib.crc32(out.tobytes()),
        })  # fmt: skip


def _verify_lossless(dst: Path, rep: AttackReport, max_pixels: int) -> None:
    """Decode the written file again: every attacked frame must come back bit for bit."""
    from daemon import media

    want = {row["frame"]: row["crc32"] for row in rep.rows}
    got = {}
    for frame in media.decode(dst, max_pixels):
        if frame.index in want:
            got[frame.index] = zlib.crc32(np.ascontiguousarray(frame.image).tobytes())
    for row in rep.rows:
        row["lossless"] = got.get(row["frame"]) == row["crc32"]
    rep.lossless = all(row["lossless"] for row in rep.rows)


def attack_file(
    cfg: Config,
    src: Path,
    dst: Path,
    method: str = "pgd",
    eps: float = 0.05,
    steps: int = 10,
    seed: int = 0,
    frames: int = 0,
    eot: int = 4,
    report: Path | None = None,
    through_frame: bool = True,
) -> AttackReport:
    """Write a disrupted copy of ``src`` and a per-frame report of what survives the re-crop.

    Videos are written losslessly (libx264rgb, CRF 0, Matroska) so the perturbation survives;
    images as PNG. ``frames > 0`` attacks only that many frames, spread evenly over the video
    (the others are copied untouched), to keep CPU demos short. The report (JSON lines, one
    per attacked frame) goes to ``report`` or :func:`report_name` beside ``dst``. With
    ``[guard] enabled``, it also gives the guard's verdict on each face the daemon will crop.
    """
    from daemon import media
    from daemon.engine import Engine

    attacker = Attacker(Engine(cfg), method, eps, steps, seed, eot, through_frame)
    info = media.probe(src)
    chosen = None
    if frames > 0:
        total = info.frames
        chosen = (
            set(np.linspace(0, max(total - 1, 0), frames).round().astype(int).tolist())
            if total
            else set(range(frames))
        )
    max_pixels = cfg.guard.max_frame_pixels
    if media.is_image(src):
        frame = next(media.decode(src, max_pixels))
        media.write_image(dst, attacker.frame(frame.image, 0))
    else:
        with media.audio_source(src) as audio:
            writer = media.VideoWriter(dst, info, codec="libx264rgb", crf=0, audio=audio)
            ok = False
            try:
                for frame in media.decode(src, max_pixels, writer.mux_audio):
                    hit = chosen is None or frame.index in chosen
                    image = attacker.frame(frame.image, frame.index) if hit else frame.image
                    writer.write(image, frame.pts)
                ok = True
            finally:
                writer.close(commit=ok)
    rep = attacker.report
    _verify_lossless(dst, rep, max_pixels)
    lines = [json.dumps({k: v for k, v in row.items() if k != "crc32"}) for row in rep.rows]
    media.write_bytes(
        report or report_name(dst), ("\n".join(lines) + "\n" if lines else "").encode()
    )
    return rep
