"""The models behind the daemon: G, the Guard, face location, and the one guard adapter.

Everything the daemon asks of the ``magdr`` library goes through this module, so a change in the
library's API is one place to follow: :meth:`Engine.guard_faces` is the adapter around
``magdr.Guard`` (or plain G with ``[guard] enabled = false``), and :meth:`Engine.find_faces` /
:meth:`Engine.paste` around ``magdr.faces.locate`` and ``magdr.faces.align``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import structlog
import torch

from daemon.config import Config
from daemon.tracks import Track
from magdr.checkpoints import resolve_device
from magdr.purifier import STEP_NAME as PURIFIER_STEP  # noqa: F401 - verdicts' chain step name

log = structlog.get_logger()


@dataclass
class FaceResult:
    """The guard's word on one face (one entry of the verdict's ``faces``)."""

    box: list[int]
    disrupted: bool
    score: float | None
    s_dist: float | None
    s_cons: float | None
    chain: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Crops:
    """Faces cut out of one frame: ``x`` ``(F, 3, S, S)`` in [-1, 1], ``rects`` ``(F, 4)``.

    ``matrices`` ``(F, 2, 3)`` (frame -> crop) when the faces were aligned, and ``rects`` are
    then the face boxes; else None and the crops are the squares ``rects``.
    """

    x: torch.Tensor
    rects: np.ndarray
    boxes: list[list[int]]
    matrices: np.ndarray | None = None


@dataclass
class FaceHint:
    """What the pipeline knows of a face besides its pixels (the batcher's per-row hint).

    Attributes:
        chain: the Rec-Net chain that cured the same face in the stream's previous frame
            (``[guard] reuse_chains``), tried before a search.
        track: the face's track (``[guard] temporal_k`` / ``temporal_n``).
    """

    chain: list[dict[str, Any]] | None = None
    track: Track | None = None


def landmark_locator(cfg: Config) -> Any:
    """The dlib landmark locator for ``[guard] align``, or None (alignment off or unavailable).

    A missing dlib or model is not fatal: faces are then cropped around their boxes, as before
    alignment existed, and a warning says so once.
    """
    g = cfg.guard
    if not g.align or g.faces != "detect":
        return None
    from magdr.faces.align import LandmarkLocator

    try:
        return LandmarkLocator()
    except FileNotFoundError as e:
        log.warning("face alignment off: faces are cropped around their boxes", error=str(e))
        return None


def _jsonable(v: Any) -> Any:
    """Chains hold tensors/numpy scalars here and there; the verdict is JSON."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Engine:
    """Loads the models once and guards batches of face crops.

    Args:
        cfg: the validated configuration (``[model]`` and ``[guard]`` are used).
        local_guard: load the guard here; False when Ray replicas guard (``daemon.ray_engine``):
            G is then loaded on the CPU only for conditions and names.
    """

    def __init__(self, cfg: Config, local_guard: bool = True) -> None:
        import magdr  # here, not at import time: the CLI's --help and --version stay fast

        self.cfg = cfg
        m, g = cfg.model, cfg.guard
        self.device = resolve_device(m.device if local_guard else "cpu")
        if m.threads:
            torch.set_num_threads(m.threads)
        t0 = time.monotonic()
        self.G = magdr.load_generator(m.generator, kind=m.kind or None, device=self.device)
        self.size = m.image_size or int(self.G.image_size)
        self.model_name = str(getattr(self.G, "meta", {}).get("name") or (
            "default" if m.generator == "default" else m.generator.rsplit("/", 1)[-1]))
        self.guard: Any = None
        self.profile_name = "off"
        self.purifier_name = "off"
        self.threshold: float | None = None
        if g.enabled and local_guard:
            self.guard = magdr.Guard(
                self.G,
                parser=None if m.parser == "none" else m.parser,
                profile=None if m.profile == "none" else m.profile,
                device=self.device,
                purifier=m.purifier,
            )
            self.profile_name = str(getattr(self.guard.profile, "name", "") or m.profile)
            self.purifier_name = "off" if self.guard.purifier is None else m.purifier
            self.threshold = float(getattr(self.guard.profile, "threshold", float("nan")))
        self._conds: dict[tuple[tuple[str, float], ...], torch.Tensor] = {}
        self.landmarks = landmark_locator(cfg)
        self._boxes: dict[str, tuple[int, Any, Any, tuple[int, ...]]] = {}
        self._boxes_lock = threading.Lock()
        self.default_cond = self.condition(m.condition)  # unknown attributes fail at start-up
        log.info("models loaded", model=self.model_name, profile=self.profile_name,
                 purifier=self.purifier_name, device=str(self.device), face_size=self.size,
                 guard=g.enabled, guarded_by="this process" if local_guard else "ray replicas",
                 seconds=round(time.monotonic() - t0, 2))

    # ---- conditions ---------------------------------------------------------------------
    def condition(self, values: dict[str, float] | None) -> torch.Tensor:
        """Condition vector ``(c_dim,)`` for ``values`` (None -> the configured edit)."""
        import magdr

        if values is None:
            return self.default_cond
        key = tuple(sorted(values.items()))
        if key not in self._conds:
            if len(self._conds) > 256:  # senders could vary conditions without end
                self._conds.clear()
            self._conds[key] = magdr.condition(self.G, values, batch=1)[0].cpu()
        return self._conds[key]

    # ---- faces --------------------------------------------------------------------------
    def find_faces(self, image: np.ndarray, stream: str | None = None) -> Crops:
        """Locate and crop the faces of one RGB frame (``[guard] faces``).

        With ``[guard] align`` (and dlib present) each face is warped so that its eyes and
        mouth land where CelebA's do (:mod:`magdr.faces.align`); else the square around its
        box is cropped. With ``[guard] detect_every = N > 1`` the boxes and landmarks found on
        a stream's frame are reused for its next N-1 frames (talking heads move little between
        frames; detection is the most expensive step of a CPU pipeline).
        """
        g = self.cfg.guard
        if g.faces == "frame":
            h, w = image.shape[:2]
            interp = cv2.INTER_AREA if min(h, w) > self.size else cv2.INTER_LINEAR
            small = cv2.resize(image, (self.size, self.size), interpolation=interp)
            x = torch.from_numpy(small).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
            return Crops(x, np.array([[0, 0, w, h]], np.int64), [[0, 0, w, h]])
        from magdr.faces.align import face_matrices, warp_faces
        from magdr.faces.locate import crop_faces, locate_faces

        boxes = mats = None
        if stream is not None and g.detect_every > 1:
            with self._boxes_lock:
                n, last, last_mats, shape = self._boxes.get(stream, (0, None, None, None))
                if last is not None and n < g.detect_every - 1 and shape == image.shape:
                    self._boxes[stream] = (n + 1, last, last_mats, shape)
                    boxes, mats = last, last_mats
        if boxes is None:
            boxes = locate_faces(image, min_size=g.min_face, max_faces=g.max_faces,
                                 max_side=g.detect_side)
            if boxes and self.landmarks is not None:
                # landmarks are found with the boxes, and reused with them
                mats = face_matrices(self.landmarks(image, boxes), boxes, self.size)
            if stream is not None and g.detect_every > 1:
                with self._boxes_lock:
                    if len(self._boxes) > 1024:  # streams come and go
                        self._boxes.clear()
                    self._boxes[stream] = (0, boxes, mats, image.shape)
        if not boxes:
            return Crops(torch.empty(0, 3, self.size, self.size), np.zeros((0, 4), np.int64), [])
        listed = [b.as_list() for b in boxes]
        if mats is not None:
            return Crops(warp_faces(image, mats, self.size), np.array(listed, np.int64), listed,
                         mats)
        x, rects = crop_faces(image, boxes, self.size)
        return Crops(x, rects, listed)

    def paste(self, image: np.ndarray, faces: torch.Tensor, crops: Crops) -> np.ndarray:
        """Put guarded faces ``(F, 3, S, S)`` back into (a copy of) the frame."""
        if len(crops.boxes) == 0:
            return image
        if self.cfg.guard.faces == "frame":
            h, w = image.shape[:2]
            pix = ((faces[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            interp = cv2.INTER_AREA if min(h, w) < self.size else cv2.INTER_LINEAR
            return cv2.resize(np.ascontiguousarray(pix), (w, h), interpolation=interp)
        if crops.matrices is not None:
            from magdr.faces.align import paste_warped

            return paste_warped(image, faces, crops.matrices)
        from magdr.faces.locate import paste_faces

        return paste_faces(image, faces, crops.rects)

    # ---- the adapter --------------------------------------------------------------------
    @torch.no_grad()
    def guard_faces(
        self, x: torch.Tensor, c: torch.Tensor, hints: list[FaceHint | None] | None = None
    ) -> tuple[torch.Tensor, list[dict]]:
        """Guard a batch of faces; the only place the daemon calls ``magdr.Guard``.

        Args:
            x: faces :math:`(B, 3, S, S)` in [-1, 1] (CPU).
            c: conditions :math:`(B, c_dim)`.
            hints: per face, what the pipeline knows of it (:class:`FaceHint`). Faces with a
                track are detected first; only those the temporal rule flags and whose own
                score is above the threshold are reconstructed.

        Returns:
            ``(faces, verdicts)``: the faces to paste back :math:`(B, 3, S, S)` on the CPU
            (x* + the edit y* - x* low-passed with ``edit_lowpass``, y* itself with 0, or x*
            with ``publish_purified``), and per face
            ``{"disrupted", "score", "s_dist", "s_cons", "chain", "reused", "cured"}``, plus,
            with ``[http]`` on, a flagged face's ``detail`` (:mod:`daemon.web.flagged`).
        """
        x, c = x.to(self.device), c.to(self.device)
        if self.guard is None:
            y = self._pasted(self.G(x, c), x)
            return y.float().cpu(), [
                {"disrupted": False, "score": None, "s_dist": None, "s_cons": None, "chain": [],
                 "reused": False}
                for _ in range(x.shape[0])
            ]
        hints = hints or [None] * x.shape[0]
        chains = [h.chain if h else None for h in hints]
        tracks = [h.track if h else None for h in hints]
        if all(t is None for t in tracks):
            return self._guard(x, c, chains)
        det = self.guard.detect(x, c)
        over = det.disrupted.tolist()
        # Every track hears its face's own verdict, in frame order (the batch is FIFO).
        act = [o if t is None else t.update(o) and o for t, o in zip(tracks, over, strict=True)]
        faces = self._pasted(det.output, x).clone()
        verdicts = [_verdict(det, i, disrupted=False, chain=[], reused=False, cured=False)
                    for i in range(x.shape[0])]
        todo = [i for i, a in enumerate(act) if a]
        if todo:
            done, per = self._guard(x[todo], c[todo], [chains[i] for i in todo])
            faces[todo] = done.to(faces)
            for j, i in enumerate(todo):
                verdicts[i] = per[j]
        self.threshold = float(self.guard.profile.threshold)
        return faces.float().cpu(), verdicts

    def _pasted(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What goes back into the frame for outputs ``y`` of inputs ``x`` (x* where cleaned)."""
        g = self.cfg.guard
        if g.publish_purified:
            return x
        if g.edit_lowpass > 0:
            from magdr.transforms import lowpass_edit

            return lowpass_edit(y, x, g.edit_lowpass)
        return y

    def _guard(
        self, x: torch.Tensor, c: torch.Tensor, chains: list[Any]
    ) -> tuple[torch.Tensor, list[dict]]:
        """``magdr.Guard`` on every face: detect, and reconstruct those above the threshold."""
        r = self.guard(x, c, hints=chains if any(chains) else None)
        faces = self._pasted(r.output, r.purified)
        verdicts = [
            _verdict(
                r, i,
                disrupted=bool(r.disrupted[i]),
                chain=_jsonable(r.chains[i]),
                reused=bool(r.reused[i]),
                # Reconstructed below the threshold: this chain is worth trying next frame.
                cured=bool(r.disrupted[i]) and float(r.score_after[i]) <= r.threshold,
            )  # fmt: skip
            for i in range(x.shape[0])
        ]
        if self.cfg.http.enabled:  # the operator page's side by side of each flagged face
            from daemon.web.flagged import flagged_details

            for v, detail in zip(verdicts, flagged_details(self.guard, x, c, r), strict=True):
                if detail is not None:
                    v["detail"] = detail
        self.threshold = float(r.threshold)
        return faces.float().cpu(), verdicts


def _verdict(r: Any, i: int, **rest: Any) -> dict[str, Any]:
    """Face ``i``'s own scores from a ``GuardResult`` or ``Detection``, plus ``rest``."""
    return {"score": _jsonable(float(r.score[i])), "s_dist": _jsonable(float(r.s_dist[i])),
            "s_cons": _jsonable(float(r.s_cons[i])), **rest}
