"""MagDR's detectors (paper §3.2.2): distortion (Eq. 4–6), consistency (Eq. 7), S_final (Eq. 9).

The functions are pure and batched; :class:`Detector` runs them for a generator G, a face
parser and a :class:`magdr.profile.Profile`, with G called once on the stacked batch of the
inputs and their K transforms (on a GPU; once on each on a CPU, where that is cheaper).

*Per-face benchmark of S_dist.* How far G's output sits from its input in a region depends on
the face as much as on an attack: a small G reconstructs an unusual face (a green-screen clip, a
dark frame) badly everywhere, and raw region distances read that as distortion. The paper
benchmarks each region against the target region (Eq. 5) for this reason, but an attack on G
moves the target region as much as the rest, so that benchmark cannot separate them. With a
``reference`` transform in the profile, each region's distance is instead benchmarked against
the same region for G run on a denoised copy of the input: :func:`excess_distances`,
d̄_i(x̂) − d̄_i(f_ref(x̂)). A clean face that G reconstructs badly is reconstructed about as
badly after a 3×3 median; a disrupted one much better, because the median breaks the
perturbation. G's output for f_ref(x̂) is one of the consistency pass's outputs, so the
benchmark costs no extra call of G when f_ref is among the K transforms.

The transforms are the profile's. The shipped default profile uses one, K = 1, as both f_1
and f_ref: the learned purifier of :mod:`magdr.purifier` (``magdr.transforms.purifier``). A
hand-made filter only moves G's output when it breaks the perturbation, and an attack made
through the daemon's resampling of video frames is smooth enough to pass a 3×3 median; the
purifier was trained to undo disruptions of this very G and to leave clean faces alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from magdr.check import check_images, check_shape
from magdr.faces.regions import REGIONS, target_mask
from magdr.metrics import DISTANCES, region_distance_matrix
from magdr.profile import Profile
from magdr.transforms import apply, bpda_apply


def region_distances(
    x: torch.Tensor, y: torch.Tensor, regions: torch.Tensor, names: list[str] | tuple[str, ...]
) -> torch.Tensor:
    """Per-region distance vectors d̄_i = D(M_i∘x, M_i∘G(x, c)) / S_i (Eq. 4).

    Args:
        x: inputs :math:`(B, 3, H, W)`.
        y: outputs G(x, c), same shape.
        regions: soft region masks M_i, :math:`(B, N, H, W)`.
        names: the distances of the vector D.

    Returns:
        :math:`(B, N, M)`, ``M = len(names)``.
    """
    check_images(x)
    check_images(y, "y")
    return region_distance_matrix(x, y, regions, names)


def excess_distances(d: torch.Tensor, d_ref: torch.Tensor | None) -> torch.Tensor:
    """The region distances that S_dist reads: d̄_i − d̄_i^ref, or d̄_i without a reference.

    Args:
        d: d̄_i of x̂ and G(x̂, c) (Eq. 4), :math:`(B, N, M)`.
        d_ref: d̄_i of f_ref(x̂) and G(f_ref(x̂), c), the face's own benchmark (module
            docstring), same shape; ``None`` for the paper's absolute distances.

    Example:
        >>> excess_distances(torch.tensor([[[0.3]]]), torch.tensor([[[0.2]]]))
        tensor([[[0.1000]]])
    """
    return d if d_ref is None else d - d_ref


def region_presence(regions: torch.Tensor, min_area: float) -> torch.Tensor:
    """Which regions cover at least ``min_area`` of the image, :math:`(B, N)` bool.

    An absent region's normalised distance (Eq. 4 divides by its area S_i) is noise.
    """
    return regions.mean(dim=(2, 3)) >= min_area


def distortion_flags(
    d: torch.Tensor, d_c: torch.Tensor, targets: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Region flags V_i (Eq. 5): 1 where a non-target region changed at least as much as M_c.

    Args:
        d: region distances d̄_i, :math:`(B, N, M)`.
        d_c: distances of the target region M_c, :math:`(B, M)`.
        targets: :math:`(B, N)` 0/1, the target regions (never flagged).
        present: :math:`(B, N)` bool, regions large enough to judge.

    Returns:
        :math:`(B, N)` bool; ``V_i = max_m(d̄_i,m − d_c,m) ≥ 0``.

    Example:
        >>> d = torch.tensor([[[0.1], [0.5], [0.2]]])  # 3 regions, 1 distance
        >>> distortion_flags(d, torch.tensor([[0.3]]), torch.tensor([[0., 0., 1.]]),
        ...                  torch.ones(1, 3, dtype=torch.bool))
        tensor([[False,  True, False]])
    """
    v = (d - d_c[:, None, :]).amax(dim=2) >= 0
    return v & present & (targets < 0.5)


def distortion_score(
    d: torch.Tensor,
    targets: torch.Tensor,
    present: torch.Tensor,
    w: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """Distortion score S_dist = Σ_{i≠c} w∘sigmoid(d̄_i) (Eq. 6), :math:`(B,)`.

    ``d`` is d̄_i itself (the paper) or its excess over the face's own benchmark
    (:func:`excess_distances`). Each distance is first standardised with the clean statistics
    ``(d̄ − μ)/σ`` of the profile (raw L1, L2, L∞ and 1−SSIM live on scales an order of
    magnitude apart), and the sum over regions is divided by the number of non-target regions
    present, so S_dist does not depend on how many regions a face shows. Items with no
    non-target region score 0.

    Args:
        d: region distances d̄_i or their excess, :math:`(B, N, M)`.
        targets: :math:`(B, N)` 0/1 target regions (left out of the sum).
        present: :math:`(B, N)` bool, regions large enough to judge.
        w: the weights of Eq. 6, :math:`(M,)`.
        mu: clean mean of each distance, :math:`(M,)`.
        sigma: clean spread of each distance, :math:`(M,)`.
    """
    z = torch.sigmoid((d - mu) / sigma.clamp_min(1e-8))  # [B, N, M]
    per_region = (z * w).sum(dim=2)  # [B, N]
    keep = (present & (targets < 0.5)).to(d)
    return (per_region * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def consistency_score(y: torch.Tensor, y_k: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """Consistency score S_cons = σ_k of d^k = D(G(x̂, c), G(f_k(x̂), c)) (Eq. 7), :math:`(B,)`.

    Args:
        y: outputs G(x̂, c), :math:`(B, 3, H, W)`.
        y_k: outputs for the K transformed inputs, :math:`(B, K, 3, H, W)`.
        distance: the distance D (a key of ``magdr.metrics.DISTANCES``).

    Returns:
        the population standard deviation over the K distances (σ = sqrt(E[(d^k − μ)²]));
        with K = 1 the one distance d^1 itself (a single value has no spread, but how far G's
        output moves under one denoising transform is the same evidence, at one pass of G).
    """
    b, k = y_k.shape[:2]
    fn = DISTANCES[distance]
    d = fn(y.repeat_interleave(k, 0), y_k.flatten(0, 1)).view(b, k)
    return d.std(dim=1, unbiased=False) if k > 1 else d[:, 0]


def final_score(s_dist: torch.Tensor, s_cons: torch.Tensor, lam: float) -> torch.Tensor:
    """S_final = λ·S_dist + S_cons (Eq. 9)."""
    return lam * s_dist + s_cons


def transformed_inputs(
    x: torch.Tensor, transforms: list[dict[str, Any]], differentiable: bool = False
) -> list[torch.Tensor]:
    """f_k(x) for each ``{"name", "params"}`` of ``transforms`` (BPDA gradients if asked)."""
    f = bpda_apply if differentiable else apply
    return [f(t["name"], x, **t.get("params", {})) for t in transforms]


def outputs_under_transforms(
    G: Callable[..., torch.Tensor],
    x: torch.Tensor,
    c: torch.Tensor | None,
    transforms: list[dict[str, Any]],
    differentiable: bool = False,
    x_k: list[torch.Tensor] | None = None,
    stacked: bool = True,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G(x, c) and G(f_k(x), c) for the K transforms: one call of G on them stacked, or one each.

    ``x_k``: the f_k(x) (:func:`transformed_inputs`) when the caller needs them too; then
    ``differentiable`` (what :func:`transformed_inputs` takes) is already decided and unused.
    ``stacked=False``: one call per input instead (the same numbers): on a CPU a batch (K+1)
    times larger costs more than (K+1) times a batch (measured 2.2–2.8× for two batches of 8
    stacked, 1.8–2.0× as two calls), on a GPU one large call is what keeps it busy.

    Returns:
        ``y`` :math:`(B, 3, H, W)` and ``y_k`` :math:`(B, K, 3, H, W)`.
    """
    if x_k is None:
        x_k = transformed_inputs(x, transforms, differentiable)
    xs = [*([] if y is not None else [x]), *x_k]
    if stacked:
        out = G(torch.cat(xs, 0), None if c is None else c.repeat(len(xs), 1))
    else:
        out = torch.cat([G(xi, c) for xi in xs], 0)
    b = x.shape[0]
    if y is None:
        y, out = out[:b], out[b:]
    y_k = out.view(len(transforms), b, *out.shape[1:]).transpose(0, 1)
    return y, y_k


def _index_of(transforms: list[dict[str, Any]], t: dict[str, Any]) -> int | None:
    """Where ``{"name", "params"}`` ``t`` is in ``transforms`` (same name and parameters)."""
    for i, u in enumerate(transforms):
        if u["name"] == t["name"] and u.get("params", {}) == t.get("params", {}):
            return i
    return None


@dataclass
class Detection:
    """What the detectors found for a batch; every field is batched.

    Attributes:
        score: S_final (Eq. 9), :math:`(B,)`.
        s_dist: S_dist (Eq. 6); s_cons: S_cons (Eq. 7).
        disrupted: ``score > threshold``, bool :math:`(B,)`.
        flags: V_i (Eq. 5), bool :math:`(B, N)` over ``REGIONS``.
        distances: d̄_i (Eq. 4), :math:`(B, N, M)`.
        excess: what S_dist standardises, :math:`(B, N, M)`: d̄_i minus the same distances for
            G on f_ref(x̂) when the profile has a ``reference``, else d̄_i.
        output: G(x̂, c), :math:`(B, 3, H, W)`.
        inputs_k: the f_k(x̂) of the K transforms, then f_ref(x̂) if it is not among them,
            :math:`(B, K', 3, H, W)`; outputs_k: G on each of them, same shape. The guard
            reuses them when f_k is its purifier.
        i_ref: where f_ref(x̂) is along ``inputs_k``'s second axis; ``None`` without a
            reference (:meth:`reference`).
    """

    score: torch.Tensor
    s_dist: torch.Tensor
    s_cons: torch.Tensor
    disrupted: torch.Tensor
    flags: torch.Tensor
    distances: torch.Tensor
    excess: torch.Tensor
    output: torch.Tensor
    inputs_k: torch.Tensor
    outputs_k: torch.Tensor
    i_ref: int | None = None

    def reference(
        self, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The face's own benchmark of items ``idx`` (all by default): f_ref(x̂), G(f_ref(x̂), c).

        ``(None, None)`` without a reference: what :meth:`Detector.distortion` takes.
        """
        return reference_pair(self.inputs_k, self.outputs_k, self.i_ref, idx)


def reference_pair(
    inputs_k: torch.Tensor,
    outputs_k: torch.Tensor,
    i_ref: int | None,
    idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """f_ref(x̂) and G(f_ref(x̂), c) out of the transformed inputs and G's outputs on them.

    Args:
        inputs_k: f_k(x̂), then f_ref(x̂) when it is not one of them, :math:`(B, K', 3, H, W)`.
        outputs_k: G on each of them, same shape.
        i_ref: f_ref's place along the second axis (:meth:`Detector.applied_transforms`);
            ``None`` without a reference, which gives ``(None, None)``.
        idx: the items wanted, all by default.
    """
    if i_ref is None:
        return None, None
    if idx is None:
        return inputs_k[:, i_ref], outputs_k[:, i_ref]
    return inputs_k[idx, i_ref], outputs_k[idx, i_ref]


class Detector(nn.Module):
    """MagDR's two sub-detectors and S_final for one generator and profile.

    Args:
        G: the generator (a :class:`magdr.models.base.Generator`).
        profile: thresholds, λ, w, the K consistency transforms.
        stacked: G once on x̂ and its K transforms stacked (a GPU), or once on each (a CPU).

    The face regions are an input (``regions`` :math:`(B, N, H, W)` from the parser), so that
    Rec-Net can score many candidates of one face against the regions parsed once.
    """

    def __init__(self, G: nn.Module, profile: Profile, stacked: bool = True) -> None:
        super().__init__()
        self.G = G
        self.profile = profile
        self.stacked = stacked

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.profile
        return tuple(
            torch.tensor(v, dtype=like.dtype, device=like.device) for v in (p.w, p.mu, p.sigma)
        )

    def applied_transforms(
        self, transforms: list[dict[str, Any]] | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The transforms behind ``Detection.inputs_k`` and where f_ref is among them.

        ``transforms`` (the profile's K by default), then f_ref when it is not one of them: the
        benchmark input rides along in G's one call, reused when it is an f_k.
        """
        p = self.profile
        ts = list(transforms or p.consistency)
        if p.reference is None:
            return ts, None
        i_ref = _index_of(ts, p.reference)
        if i_ref is None:
            i_ref = len(ts)
            ts.append(p.reference)
        return ts, i_ref

    def distortion(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_ref: torch.Tensor | None,
        y_ref: torch.Tensor | None,
        regions: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distortion detector's half: S_dist (Eq. 4–6) and the region flags V_i (Eq. 5).

        Args:
            x: inputs x̂, :math:`(B, 3, H, W)`.
            y: G(x̂, c), same shape.
            x_ref: f_ref(x̂), or ``None`` without a reference (the paper's absolute distances).
            y_ref: G(f_ref(x̂), c), or ``None``.
            regions: :math:`(B, N, H, W)` soft region masks of x̂.
            targets: :math:`(B, N)` 0/1 target regions.

        Returns:
            ``s_dist`` :math:`(B,)`, ``flags`` :math:`(B, N)`, ``distances`` and ``excess``
            :math:`(B, N, M)` (the fields of :class:`Detection`).
        """
        check_shape(regions, [str(x.shape[0]), str(len(REGIONS)), "H", "W"], "regions")
        p = self.profile
        # The target region M_c rides along as one more mask: one pass over the pixel maps.
        d_all = region_distances(
            x, y, torch.cat([regions, target_mask(regions, targets)], 1), p.distances
        )
        d, d_c = d_all[:, :-1], d_all[:, -1]
        d_ref = None
        if x_ref is not None:
            d_ref = region_distances(x_ref, y_ref, regions, p.distances)
        excess = excess_distances(d, d_ref)
        present = region_presence(regions, p.min_region_area)
        w, mu, sigma = self._stats(x)
        s_dist = distortion_score(excess, targets, present, w, mu, sigma)
        return s_dist, distortion_flags(d, d_c, targets, present), d, excess

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        regions: torch.Tensor | None,
        targets: torch.Tensor,
        transforms: list[dict[str, Any]] | None = None,
        differentiable: bool = False,
        y: torch.Tensor | None = None,
    ) -> Detection:
        """Detect disrupted inputs.

        Args:
            x: inputs x̂, :math:`(B, 3, H, W)` in [-1, 1].
            c: conditions :math:`(B, c_dim)` or ``None``.
            regions: :math:`(B, N, H, W)` soft region masks of x̂; ``None`` skips the
                distortion detector, which only a profile with λ = 0 allows (S_final is then
                S_cons alone): ``s_dist``, ``distances`` and ``excess`` come back NaN, no
                region flagged.
            targets: :math:`(B, N)` 0/1 target regions (``G.target_regions(c)``).
            transforms: the consistency transforms; the profile's K by default.
            differentiable: BPDA through the transforms (for adaptive attacks).
            y: G(x̂, c) when the caller has it (not computed again).
        """
        check_images(x)
        p = self.profile
        if regions is None and p.lam != 0:
            raise ValueError(f"regions: needed for S_dist, whose weight λ is {p.lam:g}")
        k = len(transforms or p.consistency)
        transforms, i_ref = self.applied_transforms(transforms)
        x_all = transformed_inputs(x, transforms, differentiable)
        y, y_all = outputs_under_transforms(
            self.G, x, c, transforms, x_k=x_all, stacked=self.stacked, y=y
        )
        s_cons = consistency_score(y, y_all[:, :k], p.cons_distance)
        inputs_k = torch.stack(x_all, 1)
        if regions is None:
            b, m = x.shape[0], len(p.distances)
            d, excess = (x.new_full((b, len(REGIONS), m), float("nan")) for _ in range(2))
            s_dist = x.new_full((b,), float("nan"))
            flags = torch.zeros(b, len(REGIONS), dtype=torch.bool, device=x.device)
            score = s_cons
        else:
            ref = reference_pair(inputs_k, y_all, i_ref)
            s_dist, flags, d, excess = self.distortion(x, y, *ref, regions, targets)
            score = final_score(s_dist, s_cons, p.lam)
        return Detection(
            score=score,
            s_dist=s_dist,
            s_cons=s_cons,
            disrupted=score > p.threshold,
            flags=flags,
            distances=d,
            excess=excess,
            output=y,
            inputs_k=inputs_k,
            outputs_k=y_all,
            i_ref=i_ref,
        )
