"""The models behind the daemon: G, the Guard, face location, and the one guard adapter.

Everything the daemon asks of the ``magdr`` library goes through this module, so a change in the
library's API is one place to follow: :meth:`Engine.guard_faces` is the adapter around
``magdr.Guard`` (or plain G with ``[guard] enabled = false``), and :meth:`Engine.find_faces` /
:meth:`Engine.paste` around ``magdr.faces.locate`` and ``magdr.faces.align``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from daemon.config import Config
from daemon.framing import Crops, Framing
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
class FaceHint:
    """What the pipeline knows of a face besides its pixels (the batcher's per-row hint).

    Attributes:
        chain: the Rec-Net chain that cured the same face in the stream's previous frame
            (``[guard] reuse_chains``), tried before a search.
        track: the face's track (``[guard] temporal_k`` / ``temporal_n``).
    """

    chain: list[dict[str, Any]] | None = None
    track: Track | None = None


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


class LowPrecision:
    """Runs chosen networks in ``bfloat16`` inside :meth:`active`, handing back ``float32``.

    G and the face parser are most of a clean face's cost; on a CPU with AVX-512 BF16 (or a
    CUDA GPU) they run about twice as fast in ``bfloat16``. The networks keep their weights,
    names and digests (hooks, not wrappers, so ``purifier = "auto"`` still recognises G);
    outside :meth:`active` they run as before, so attacks and calibration stay ``float32``.
    Everything between the networks (scores, thresholds, masks) stays ``float32``.

    Args:
        device: where the networks run.
        dtype: ``torch.bfloat16`` (or ``torch.float16`` on CUDA).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device.type, dtype
        self._local = threading.local()  # autocast state is per thread too

    def attach(self, *nets: torch.nn.Module) -> None:
        """Make each net's forward pass autocast while :meth:`active` is on."""
        for net in nets:
            net.register_forward_pre_hook(self._enter)
            net.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        stack = self._local.__dict__.setdefault("stack", [])
        ctx = None
        if getattr(self._local, "on", False):
            ctx = torch.autocast(self.device_type, dtype=self.dtype)
            ctx.__enter__()
        stack.append(ctx)

    def _exit(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        ctx = self._local.stack.pop()
        if ctx is None:
            return out
        ctx.__exit__(None, None, None)
        return out.float() if isinstance(out, torch.Tensor) else out

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the attached networks run in :attr:`dtype`."""
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``[model] precision`` on ``device``: ``"auto"`` is ``bfloat16`` where it is fast."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # AVX-512 BF16 / AMX: oneDNN runs bfloat16 convolutions natively; elsewhere it emulates them
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class RegionCache:
    """Each stream's faces' parsed regions, reused for ``every`` frames.

    Aligned crops of a followed face change little from one frame to the next, and a region
    mask is feathered anyway: parsing a stream's faces every few frames instead of every frame
    takes the parser (about a pass of G) off most frames. Faces are matched to their cached
    regions by box overlap; a new, moved or resized face is parsed at once.
    """

    MAX_STREAMS = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # stream -> per face: (box [x, y, w, h], regions (N, S, S), frames since parsed)
        self._faces: dict[str, list[tuple[list[int], torch.Tensor, int]]] = {}

    def get(self, parse: Any, crops: Crops, stream: str | None, every: int) -> torch.Tensor:
        """Regions :math:`(F, N, S, S)` of ``crops``: cached where fresh, else ``parse(x)``.

        Frames of one stream are pasted on several threads; the lookup, the parse and the
        update are one step, so two frames in a row do not both parse the same face.
        """
        from magdr.faces.locate import FaceBox
        from magdr.faces.track import iou

        if stream is None:
            return parse(crops.x)
        boxes = [FaceBox(*b, 0.0) for b in crops.boxes]
        with self._lock:
            cached = self._faces.pop(stream, [])  # re-inserted last: the dict keeps recent last
            found: list[tuple[torch.Tensor, int] | None] = []
            for b in boxes:
                best = max(cached, key=lambda e: iou(b, FaceBox(*e[0], 0.0)), default=None)
                fresh = (
                    best is not None
                    and best[2] + 1 < every
                    and iou(b, FaceBox(*best[0], 0.0)) >= 0.5
                )
                found.append((best[1], best[2] + 1) if fresh else None)
            todo = [i for i, f in enumerate(found) if f is None]
            if todo:
                parsed = parse(crops.x[todo])
                for j, i in enumerate(todo):
                    found[i] = (parsed[j], 0)
            self._faces[stream] = [
                (b, r, age) for b, (r, age) in zip(crops.boxes, found, strict=True)
            ]  # type: ignore[misc]
            while len(self._faces) > self.MAX_STREAMS:
                self._faces.pop(next(iter(self._faces)))
        return torch.stack([f[0] for f in found])  # type: ignore[index]


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
        self.model_name = str(
            getattr(self.G, "meta", {}).get("name")
            or ("default" if m.generator == "default" else m.generator.rsplit("/", 1)[-1])
        )
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
                purify_all=m.purify == "all",
            )
            self.profile_name = str(getattr(self.guard.profile, "name", "") or m.profile)
            self.purifier_name = "off" if self.guard.purifier is None else m.purifier
            self.threshold = float(getattr(self.guard.profile, "threshold", float("nan")))
        # The face parser of paste_mask = "region" (the guard's own when there is one); it
        # runs where frames are pasted, so Ray replicas need none.
        self.parser: Any = None
        if g.paste_mask == "region" and m.parser != "none":
            if self.guard is not None:
                self.parser = self.guard.parser
            else:
                from magdr.faces.parsing import load_parser

                self.parser = load_parser(m.parser, device=self.device)
        self._regions = RegionCache()
        # One network call at a time: torch already spreads each call over every core, and two
        # at once (the guard's batch, a paste's parse) oversubscribe them and both crawl.
        self._compute = threading.Lock()
        self.dtype = inference_dtype(m.precision, self.device)
        self.low_precision = LowPrecision(self.device, self.dtype)
        if self.dtype != torch.float32:
            self.low_precision.attach(*{id(n): n for n in (self.G, self.parser) if n}.values())
        self._conds: dict[tuple[tuple[str, float], ...], torch.Tensor] = {}
        self.framing = Framing(cfg, self.size)
        self.landmarks = self.framing.landmarks
        self.default_cond = self.condition(m.condition)  # unknown attributes fail at start-up
        log.info(
            "models loaded",
            model=self.model_name,
            profile=self.profile_name,
            purifier=self.purifier_name,
            device=str(self.device),
            face_size=self.size,
            dtype=str(self.dtype).removeprefix("torch."),
            guard=g.enabled,
            guarded_by="this process" if local_guard else "ray replicas",
            seconds=round(time.monotonic() - t0, 2),
        )

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
        """Locate, align and crop the faces of one RGB frame (:meth:`Framing.find_faces`)."""
        return self.framing.find_faces(image, stream)

    def paste(
        self,
        image: np.ndarray,
        faces: torch.Tensor,
        crops: Crops,
        c: torch.Tensor | None = None,
        stream: str | None = None,
    ) -> np.ndarray:
        """Put guarded faces ``(F, 3, S, S)`` of condition ``c`` back into (a copy of) the frame.

        With ``paste_mask = "region"`` only the regions the edit targets change
        (:func:`magdr.faces.mask.region_mask`): the rest of the face keeps its own pixels, not
        G's reconstruction of them. The face parser runs on a stream's faces every
        ``region_every`` frames; in between each face reuses its last regions
        (:class:`RegionCache`).
        """
        g = self.cfg.guard
        mask = None
        if (
            g.paste_mask == "region"
            and self.parser is not None
            and not g.publish_purified
            and len(crops.boxes)
            and g.faces == "detect"
        ):
            from magdr.faces.mask import region_mask

            c = self.default_cond if c is None else c
            one = c[None] if c.dim() == 1 else c[:1]  # the frame's condition (c_dim may be 0)
            targets = self.G.target_regions(one, batch=1).cpu()
            mask = region_mask(
                self._regions.get(self._parse, crops, stream, g.region_every),
                targets.expand(len(crops.boxes), -1),
            )
        return self.framing.paste(image, faces, crops, mask)

    @torch.no_grad()
    def _parse(self, x: torch.Tensor) -> torch.Tensor:
        """Soft attribute regions :math:`(B, N, S, S)` of crops ``x``, on the CPU."""
        from magdr.faces.regions import group_regions

        with self._compute, self.low_precision.active():
            return group_regions(self.parser(x.to(self.device))).float().cpu()

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
        with self._compute, self.low_precision.active():
            return self._guard_faces(x.to(self.device), c.to(self.device), hints)

    def _guard_faces(
        self, x: torch.Tensor, c: torch.Tensor, hints: list[FaceHint | None] | None
    ) -> tuple[torch.Tensor, list[dict]]:
        if self.guard is None:
            y = self._pasted(self.G(x, c), x)
            return y.float().cpu(), [
                {
                    "disrupted": False,
                    "score": None,
                    "s_dist": None,
                    "s_cons": None,
                    "chain": [],
                    "reused": False,
                }
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
        verdicts = [
            _verdict(det, i, disrupted=False, chain=[], reused=False, cured=False)
            for i in range(x.shape[0])
        ]
        todo = [i for i, a in enumerate(act) if a]
        if todo:
            done, per = self._guard(x[todo], c[todo], [chains[i] for i in todo])
            faces[todo] = done.to(faces)
            for j, i in enumerate(todo):
                verdicts[i] = per[j]
        self.threshold = float(self.guard.profile.threshold)
        return faces.float().cpu(), verdicts

    def _pasted(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What goes back into the frame for outputs ``y`` of inputs ``x`` (x* where cleaned).

        The edit ``y - x`` low-passed with ``edit_lowpass``, on ``x``.
        """
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
                r,
                i,
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
    return {
        "score": _jsonable(float(r.score[i])),
        "s_dist": _jsonable(float(r.s_dist[i])),
        "s_cons": _jsonable(float(r.s_cons[i])),
        **rest,
    }
