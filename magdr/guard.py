"""The Guard: detect disrupted inputs of G and reconstruct them (paper Fig. 2, DESIGN §1/§3).

Per batch of faces x̂ and conditions c::

    y = G(x̂, c)                       (with the K transformed inputs: stacked on a GPU)
    M = regions(parser(x̂))            19 soft classes -> N attribute regions (with λ = 0 only
                                       where a hint or Rec-Net's search needs region patches)
    S_final = λ·S_dist + S_cons        Eq. 4-7, 9  -> disrupted?
    if disrupted: x* = P(x̂)           the learned purifier (magdr.purifier), when G has one
                                       (with ``purify_all``: x* = P(x̂) for every face);
                  x* = RecNet(x*)     Algorithm 1 per region patch, if S_final(x*) is still high;
                  y* = G(x*, c)       check again
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from torch import nn

from magdr.check import check_images
from magdr.checkpoints import resolve_device
from magdr.detect import Detection, Detector
from magdr.faces.regions import REGIONS, group_regions
from magdr.profile import Profile, load_profile
from magdr.purifier import STEP_NAME, purifier_for, purifier_path
from magdr.reconstruct import infer
from magdr.transforms import apply_chain

log = logging.getLogger(__name__)


def _rows(v: Any, index: Any) -> Any:
    """``v[index]``, or None for an absent ``v`` (no condition, no hints)."""
    return None if v is None else v[index]


def _purifier_step() -> dict[str, Any]:
    """The chain entry of a face given to the learned purifier (whole face, one layer)."""
    return {"name": STEP_NAME, "params": {}, "region": "all", "layer": 0}


class _Regions:
    """A batch's region masks M_i, each face parsed on first use.

    With λ = 0 the verdict is S_cons's, and the parser (about a pass of G) is spent only on the
    faces whose hint or Rec-Net search needs region patches; their S_dist and region flags are
    then filled into the detection. With λ > 0 every face is parsed up front (``full``).
    """

    def __init__(
        self,
        guard: Guard,
        x: torch.Tensor,
        det: Detection,
        targets: torch.Tensor,
        full: torch.Tensor | None = None,
    ) -> None:
        self.guard, self.x, self.det, self.targets = guard, x, det, targets
        self.lazy = full is None
        b = x.shape[0]
        self.masks = x.new_zeros(b, len(REGIONS), *x.shape[2:]) if full is None else full
        self.parsed = torch.full((b,), not self.lazy, dtype=torch.bool, device=x.device)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """The masks of items ``idx`` :math:`(n, N, H, W)`, parsing those not parsed yet."""
        new = idx[~self.parsed[idx]]
        if new.numel():
            g, det = self.guard, self.det
            self.masks[new] = g.regions(self.x[new])
            self.parsed[new] = True
            x_ref, y_ref = det.reference(new)
            s_dist, flags, d, excess = g.detector.distortion(
                self.x[new], det.output[new], x_ref, y_ref, self.masks[new], self.targets[new]
            )
            det.s_dist[new], det.flags[new], det.distances[new], det.excess[new] = (
                s_dist, flags, d, excess,
            )  # fmt: skip
        return self.masks[idx]

    def scoring(self, idx: torch.Tensor) -> torch.Tensor | None:
        """What the detector takes for items ``idx``: their masks, or ``None`` with λ = 0."""
        return None if self.lazy else self.get(idx)


@dataclass
class GuardResult:
    """The guard's verdict for a batch; tensors are batched on the input's device.

    Attributes:
        disrupted: bool :math:`(B,)`, S_final of the input above the threshold.
        score: S_final of the input (Eq. 9), :math:`(B,)`.
        s_dist: S_dist (Eq. 6), :math:`(B,)`. With the profile's λ = 0 it does not count, and
            only items whose reconstruction needed their region patches (a hint, Rec-Net's
            search) are parsed: NaN elsewhere.
        s_cons: S_cons (Eq. 7), :math:`(B,)`.
        output: :math:`(B, 3, H, W)`, G(purified, c); equals G(x, c) where not disrupted
            (G(P(x), c) there when the guard purifies every face, ``Guard(purify_all=True)``).
        purified: :math:`(B, 3, H, W)`, the input given to G for ``output``.
        chains: per item, the transforms applied (``name``, ``params``, ``region``, ``layer``).
        threshold: the profile's threshold on S_final.
        score_after: S_final of ``purified`` :math:`(B,)`; ``score`` where not disrupted (also
            under ``purify_all``: a face that passed is not scored again).
        flags: V_i (Eq. 5), bool :math:`(B, N)` over ``magdr.faces.regions.REGIONS``.
        reused: bool :math:`(B,)`, the item's chain is the ``hints`` chain it was given (no
            Rec-Net search ran for it).
    """

    disrupted: torch.Tensor
    score: torch.Tensor
    s_dist: torch.Tensor
    s_cons: torch.Tensor
    output: torch.Tensor
    purified: torch.Tensor
    chains: list[list[dict[str, Any]]]
    threshold: float
    score_after: torch.Tensor
    flags: torch.Tensor
    reused: torch.Tensor

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @staticmethod
    def cat(parts: list[GuardResult]) -> GuardResult:
        """Concatenate results of consecutive sub-batches."""
        out: dict[str, Any] = {}
        for f in fields(GuardResult):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "chains":
                out[f.name] = [ch for v in vals for ch in v]
            elif f.name == "threshold":
                out[f.name] = vals[0]
            else:
                out[f.name] = torch.cat(vals)
        return GuardResult(**out)


class Guard(nn.Module):
    """MagDR around a generator: ``guard(x, c) -> GuardResult`` (DESIGN §3).

    Args:
        G: the generator to guard (``magdr.load_generator``).
        parser: a face parser, ``"default"``, ``"landmarks"`` or a checkpoint path.
        profile: a :class:`Profile`, ``"default"`` (shipped beside the default weights) or a path.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``.
        max_batch: items per forward pass; larger batches are split.
        recnet_chunk: Rec-Net candidates scored per call (each costs 1 + K' passes of G);
            ``None``: 32 on the CPU (larger chunks measured no faster there), 256 on CUDA,
            where 32 small images leave the GPU mostly idle.
        purifier: the learned purifier tried on a flagged face before Rec-Net's search
            (:mod:`magdr.purifier`): a module, a checkpoint path, ``"auto"`` (the shipped one
            when it was trained against this G's weights, else none) or ``None`` (Rec-Net
            alone, as the paper).
        purify_all: publish G(P(x̂), c) for every face, not only for the flagged ones, so that
            no face's output hangs on the flag alone: an attacker must then beat P itself
            (``bench.end_to_end``). Costs a pass of P and of G per face that passes; needs a
            purifier.

    Example:
        >>> import magdr  # doctest: +SKIP
        >>> guard = magdr.Guard(magdr.load_generator("default"))  # doctest: +SKIP
        >>> c = magdr.condition(guard.G, {"Blond_Hair": 1}, batch=len(x))  # doctest: +SKIP
        >>> r = guard(x, c)  # doctest: +SKIP
    """

    def __init__(
        self,
        G: nn.Module,
        parser: nn.Module | str | None = "default",
        profile: Profile | str | None = "default",
        device: str | torch.device = "auto",
        max_batch: int = 64,
        recnet_chunk: int | None = None,
        purifier: nn.Module | str | None = "auto",
        purify_all: bool = False,
    ) -> None:
        super().__init__()
        self.device = resolve_device(device)
        self.G = G.to(self.device).eval()
        if parser is None or isinstance(parser, str):
            from magdr.faces.parsing import load_parser

            parser = load_parser(parser or "default", device=self.device)
        self.parser = parser.to(self.device).eval()
        self.profile = load_profile(profile)
        self.detector = Detector(self.G, self.profile, stacked=self.device.type != "cpu")
        self.max_batch = max_batch
        self.recnet_chunk = recnet_chunk or (256 if self.device.type == "cuda" else 32)
        self.purifier = purifier_for(self.G, purifier, self.device)
        if purify_all and self.purifier is None:
            raise ValueError(
                "purify_all: the guard has no purifier (purifier=None, or 'auto' for a "
                "generator the shipped one was not trained against)"
            )
        self.purify_all = bool(purify_all)
        self._purifier_k = self._purifier_in_detector()

    def _purifier_in_detector(self) -> int | None:
        """Where the detector already runs this guard's purifier (``Detection.inputs_k``).

        With the purifier among the consistency transforms, a flagged face's P(x̂) and
        G(P(x̂), c) come with its detection, and :meth:`_purify` does not compute them again.
        """
        source = getattr(self.purifier, "source", None)
        if source is None:
            return None
        for k, t in enumerate(self.detector.applied_transforms()[0]):
            path = t.get("params", {}).get("path", "default")
            if t["name"] == STEP_NAME and purifier_path(path).resolve() == source:
                return k
        return None

    # ---- pieces -------------------------------------------------------------------------
    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """Soft attribute regions M_i of faces x, :math:`(B, N, H, W)`."""
        return group_regions(self.parser(x))

    def _targets(self, c: torch.Tensor | None, b: int) -> torch.Tensor:
        return self.G.target_regions(c, batch=b).to(self.device)

    @property
    def _patch_names(self) -> list[str]:
        """The names chains give Rec-Net's region patches (``"hair"``, ``"eyes+brows"``…)."""
        return ["+".join(patch) for patch in self.profile.recnet.patches]

    def _patches(self, regions: torch.Tensor) -> torch.Tensor:
        idx = [[REGIONS.index(r) for r in patch] for patch in self.profile.recnet.patches]
        return torch.stack([regions[:, i].sum(1) for i in idx], dim=1)

    def _run_chain(
        self,
        x: torch.Tensor,
        patches: torch.Tensor,
        names: list[str],
        chain: list[dict[str, Any]],
        differentiable: bool = False,
    ) -> torch.Tensor:
        """One face ``(3, S, S)`` through a chain, each step inside its region patch.

        Raises ``KeyError``/``ValueError`` for a step this guard cannot take (a patch or
        transform this profile does not have, a purifier it lacks).
        """
        out = x[None]
        for step in chain:
            if step["name"] == STEP_NAME:
                if self.purifier is None:
                    raise KeyError(STEP_NAME)
                out = self.purifier(out)
                continue
            mask = patches[names.index(step["region"])][None, None]
            out = apply_chain(out, [step], mask, differentiable)
        return out[0]

    def _apply_hint(
        self, x: torch.Tensor, patches: torch.Tensor, names: list[str], chain: list[dict[str, Any]]
    ) -> torch.Tensor:
        """A hint's chain on one face.

        A chain built under another profile, or with a purifier this guard lacks, leaves the
        face unchanged, so the search runs for it.
        """
        try:
            return self._run_chain(x, patches, names, chain)
        except (KeyError, ValueError, TypeError):
            return x

    def replay(
        self, x: torch.Tensor, chains: list[list[dict[str, Any]]], differentiable: bool = False
    ) -> torch.Tensor:
        """The purified faces x* that ``chains`` (``GuardResult.chains``) make of faces x.

        ``guard.replay(x, guard(x, c).chains)`` is ``purified`` again; with ``differentiable``
        the result has a gradient w.r.t. x (BPDA through the steps without one, the region
        patches parsed from x without gradient, as the guard does): an adaptive attacker's
        model of Rec-Net's search, whose choice of chain has no gradient (``bench.end_to_end``).
        """
        x = self._faces(x, detach=not differentiable)
        if len(chains) != x.shape[0]:
            raise ValueError(f"chains: expected {x.shape[0]} entries, got {len(chains)}")
        names = self._patch_names
        patches = x.new_zeros(x.shape[0], len(names), *x.shape[2:])
        idx = [i for i, ch in enumerate(chains) if any(st["name"] != STEP_NAME for st in ch)]
        if idx:
            with torch.no_grad():
                patches[idx] = self._patches(self.regions(x[idx].detach()))
        return torch.stack(
            [self._run_chain(x[i], patches[i], names, ch, differentiable)
             for i, ch in enumerate(chains)]
        )  # fmt: skip

    def detect(self, x: torch.Tensor, c: torch.Tensor | None = None) -> Detection:
        """Run only the detectors (no reconstruction)."""
        x, c = self._prepare(x, c)
        with torch.inference_mode():
            return self.detector(x, c, self.regions(x), self._targets(c, x.shape[0]))

    def score(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """S_final (Eq. 9) of x, differentiable w.r.t. x (BPDA through the transforms).

        For adaptive attacks (Eq. 3): call it with gradients enabled. The face regions are
        taken as constants (parsed without gradient), as the guard parses the given input.
        """
        x, c = self._prepare(x, c, detach=False)
        with torch.no_grad():
            regions = self.regions(x.detach())
        return self.detector(x, c, regions, self._targets(c, x.shape[0]), differentiable=True).score

    def _faces(self, x: torch.Tensor, detach: bool = True) -> torch.Tensor:
        """Faces x checked (shape, range, G's size) and moved to the guard's device."""
        check_images(x)
        size = getattr(self.G, "image_size", None)
        if size and tuple(x.shape[2:]) != (size, size):
            raise ValueError(
                f"x: expected faces of {size}x{size} (G.image_size), got {list(x.shape[2:])}"
            )
        x = x.to(self.device, torch.float32)
        return x.detach() if detach else x

    def _prepare(
        self, x: torch.Tensor, c: torch.Tensor | None, detach: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._faces(x, detach)
        c_dim = getattr(self.G, "c_dim", 0)
        if c_dim:
            if c is None or c.shape != (x.shape[0], c_dim):
                got = None if c is None else list(c.shape)
                raise ValueError(f"c: expected shape [{x.shape[0]},{c_dim}], got {got}")
            c = c.to(self.device, torch.float32)
        else:
            c = None
        return x, c

    def _score_candidates(
        self,
        xc: torch.Tensor,
        idx: torch.Tensor,
        c: torch.Tensor | None,
        regions: torch.Tensor | None,
        targets: torch.Tensor,
        transforms: list[dict[str, Any]],
    ) -> torch.Tensor:
        """S_final of Rec-Net candidates ``xc``, each scored against item ``idx``'s regions."""
        cc = _rows(c, idx)
        return self.detector(xc, cc, _rows(regions, idx), targets[idx], transforms).score

    def _purify(
        self,
        x: torch.Tensor,
        det: Detection,
        c: torch.Tensor | None,
        regions: _Regions,
        targets: torch.Tensor,
        todo: torch.Tensor,
        purified: torch.Tensor,
        output: torch.Tensor,
        score_after: torch.Tensor,
        chains: list[list[dict[str, Any]]],
    ) -> torch.Tensor:
        """The learned purifier on the flagged items ``todo``; returns those still disrupted.

        Every item takes P's output where it lowers S_final (Eq. 9), so Rec-Net's search, when
        still needed, starts from the purified face; the regions of x̂ are kept. The search
        runs wherever S_final of P's output is still above the threshold, also when the
        detector's own transform is a purifier: trusting P wherever it merely lowered S_final
        published a disrupted G(P(x̂)) for 8 of 16 faces at ε 0.1 (``bench.end_to_end``).
        """
        k = self._purifier_k
        if k is None:
            x_p, y_p = self.purifier(x[todo]), None
        else:  # the detector ran P already: P(x̂) and G(P(x̂), c) come with det
            x_p, y_p = det.inputs_k[todo, k], det.outputs_k[todo, k]
        sub_c = _rows(c, todo)
        again = self.detector(x_p, sub_c, regions.scoring(todo), targets[todo], y=y_p)
        better = again.score < score_after[todo]
        for j, i in enumerate(todo.tolist()):
            if better[j]:
                purified[i], output[i], score_after[i] = x_p[j], again.output[j], again.score[j]
                chains[i].append(_purifier_step())
        return todo[~(better & ~again.disrupted)]

    def _purify_passed(
        self,
        x: torch.Tensor,
        det: Detection,
        c: torch.Tensor | None,
        purified: torch.Tensor,
        output: torch.Tensor,
        chains: list[list[dict[str, Any]]],
    ) -> None:
        """``purify_all``: the faces that passed get P(x̂) and G(P(x̂), c) too (in place)."""
        idx = (~det.disrupted).nonzero().flatten()
        if idx.numel() == 0:
            return
        k = self._purifier_k
        if k is None:
            x_p = self.purifier(x[idx])
            y_p = self.G(x_p, _rows(c, idx))
        else:  # the detector ran P already
            x_p, y_p = det.inputs_k[idx, k], det.outputs_k[idx, k]
        purified[idx], output[idx] = x_p, y_p
        for i in idx.tolist():
            chains[i] = [_purifier_step()]

    # ---- the guard ----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        hints: list[list[dict[str, Any]] | None] | None = None,
    ) -> GuardResult:
        """Guard a batch: detect, reconstruct the disrupted items, re-run G on them.

        Args:
            x: faces x̂, :math:`(B, 3, S, S)` in [-1, 1], S = ``G.image_size``.
            c: conditions :math:`(B, c_dim)` (``magdr.condition``); ``None`` if G has none.
            hints: per item, a chain to try before searching (e.g. the chain the same face got
                in the previous video frame: a perturbation and its cure change little from
                frame to frame). A disrupted item whose hint brings S_final below the threshold
                keeps it and skips Rec-Net's search (hundreds of G passes); otherwise, and for
                ``None`` entries, the search runs as usual.
        """
        home = x.device
        x, c = self._prepare(x, c)
        if hints is not None and len(hints) != x.shape[0]:
            raise ValueError(f"hints: expected {x.shape[0]} entries, got {len(hints)}")
        with torch.inference_mode():
            batches = [slice(i, i + self.max_batch) for i in range(0, x.shape[0], self.max_batch)]
            parts = [self._guard_split(x[s], _rows(c, s), _rows(hints, s)) for s in batches]
        r = GuardResult.cat(parts)
        for f in fields(GuardResult):
            v = getattr(r, f.name)
            if isinstance(v, torch.Tensor):
                setattr(r, f.name, v.to(home))
        return r

    def _guard_split(
        self, x: torch.Tensor, c: torch.Tensor | None, hints: list[Any] | None = None
    ) -> GuardResult:
        """Guard a sub-batch; on out-of-memory split it in halves and retry (never drop)."""
        try:
            return self._guard(x, c, hints)
        except torch.OutOfMemoryError:
            b = x.shape[0]
            if b == 1:
                raise
            log.warning("out of memory on a batch of %d faces: splitting and retrying", b)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            h = b // 2
            halves = [slice(None, h), slice(h, None)]
            return GuardResult.cat(
                [self._guard_split(x[s], _rows(c, s), _rows(hints, s)) for s in halves]
            )

    def _guard(
        self, x: torch.Tensor, c: torch.Tensor | None, hints: list[Any] | None = None
    ) -> GuardResult:
        p = self.profile
        b = x.shape[0]
        targets = self._targets(c, b)
        if p.lam == 0:  # S_final is S_cons alone: faces are parsed only where needed
            det = self.detector(x, c, None, targets)
            regions = _Regions(self, x, det, targets)
        else:
            full = self.regions(x)
            det = self.detector(x, c, full, targets)
            regions = _Regions(self, x, det, targets, full)
        purified, output, score_after = x.clone(), det.output.clone(), det.score.clone()
        chains: list[list[dict[str, Any]]] = [[] for _ in range(b)]
        reused = torch.zeros(b, dtype=torch.bool, device=x.device)
        names = self._patch_names
        search_transforms = p.consistency[: max(1, p.recnet.score_transforms)]
        if self.purify_all:
            self._purify_passed(x, det, c, purified, output, chains)
        todo = det.disrupted.nonzero().flatten()
        tried = [i for i in todo.tolist() if hints is not None and hints[i]]
        if tried:
            idx = torch.tensor(tried, device=x.device)
            in_regions = [i for i in tried if any(st["name"] != STEP_NAME for st in hints[i])]
            if in_regions:  # a purifier-only chain needs no region patches
                regions.get(torch.tensor(in_regions, device=x.device))
            patches = self._patches(regions.masks[idx])
            x_h = torch.stack(
                [self._apply_hint(x[i], patches[j], names, hints[i]) for j, i in enumerate(tried)]
            )
            sub_c = _rows(c, idx)
            again = self.detector(x_h, sub_c, regions.scoring(idx), targets[idx])
            cured = ~again.disrupted
            for j, i in enumerate(tried):
                if cured[j]:
                    purified[i], output[i], score_after[i] = x_h[j], again.output[j], again.score[j]
                    chains[i] = [dict(step) for step in hints[i]]
                    reused[i] = True
            todo = todo[~reused[todo]]
        if self.purifier is not None and todo.numel():
            todo = self._purify(
                x, det, c, regions, targets, todo, purified, output, score_after, chains
            )
        for _ in range(p.recnet.max_rounds):
            if todo.numel() == 0:
                break
            sub_c = _rows(c, todo)
            sub_regions, sub_targets = regions.get(todo), targets[todo]
            scoring = regions.scoring(todo)
            score_fn = partial(
                self._score_candidates, c=sub_c, regions=scoring, targets=sub_targets,
                transforms=search_transforms,
            )  # fmt: skip
            x_star, sub_chains, _ = infer(
                purified[todo], score_fn, self._patches(sub_regions), p.recnet.q_layers(), names,
                top_categories=p.recnet.top_categories, min_area=p.min_region_area,
                chunk=self.recnet_chunk,
            )  # fmt: skip
            again = self.detector(x_star, sub_c, scoring, sub_targets)
            purified[todo], output[todo], score_after[todo] = x_star, again.output, again.score
            for j, i in enumerate(todo.tolist()):
                chains[i].extend(sub_chains[j])
            todo = todo[again.disrupted]
        return GuardResult(
            disrupted=det.disrupted,
            score=det.score,
            s_dist=det.s_dist,
            s_cons=det.s_cons,
            output=output,
            purified=purified,
            chains=chains,
            threshold=float(p.threshold),
            score_after=score_after,
            flags=det.flags,
            reused=reused,
        )
