"""Disrupting attacks on face image-to-image generators (paper §3.1, Eq. 1–3).

Every attack is a small class with public settings, in the manner of torchattacks'
``attacks/pgd.py`` (``PGD(G, eps=..., step=..., steps=...)``, called as ``attack(x, c)``), and a
function of the same name that builds the class and calls it once: one implementation, not two.

- :class:`PGD` / :func:`pgd`: untargeted L∞ PGD with a random start (Eq. 1), the setting of
  Ruiz et al., "Disrupting Deepfakes" (ε = 0.05, step 0.01, 10 iterations, images in [-1, 1],
  gradient ascent on the MSE between G(x̂, c) and the clean output r = G(x, c)).
- :class:`IFGSM` / :func:`ifgsm`: the same without random start (I-FGSM), deterministic.
- :class:`Targeted` / :func:`targeted`: L∞ PGD descending the MSE to a chosen output r_t (Eq. 2).
- :class:`CWL2` / :func:`cw_l2`: Carlini–Wagner L2 adapted to image-to-image models.
- :class:`AdaptivePGD` / :func:`adaptive_pgd`: defence-aware PGD (Eq. 3) through the guard's own
  consistency and Rec-Net transforms with Expectation over Transformation, BPDA for the
  non-differentiable ones (JPEG, median), optionally also pushing the guard's score down.

All attacks take faces ``x`` :math:`(B, 3, H, W)` in [-1, 1] and a condition ``c``
:math:`(B, c_dim)` (``None`` for unconditional generators), return ``x_adv`` of the same shape,
dtype and device, detached, in [-1, 1], and leave the generator (and the guard) exactly as they
found it: train/eval mode and ``requires_grad`` flags are restored in ``finally``. During the
attack the modules are put in eval mode with frozen parameters, so no parameter gradients are
computed; gradients are taken with :func:`torch.autograd.grad` on the input only.

Example:
    >>> from magdr.models.stargan import StarGAN
    >>> G = StarGAN(conv_dim=8, c_dim=5, repeat_num=1)
    >>> x, c = torch.zeros(2, 3, 16, 16), torch.zeros(2, 5)
    >>> pgd(G, x, c, steps=2).shape
    torch.Size([2, 3, 16, 16])
    >>> PGD(G, eps=0.05, step=0.01, steps=2)(x, c).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from magdr.check import ShapeError, check_images, check_same_shape

__all__ = [
    "AdaptivePGD",
    "Attack",
    "CWL2",
    "IFGSM",
    "PGD",
    "Targeted",
    "adaptive_pgd",
    "cw_l2",
    "ifgsm",
    "pgd",
    "targeted",
]

#: A transform for the adaptive attack: ``{"name": ..., "params": {...}}`` naming an entry of
#: :data:`magdr.transforms.REGISTRY`, or any callable ``x -> x'`` on ``[B,3,H,W]`` in [-1, 1].
TransformSpec = dict[str, Any] | Callable[[torch.Tensor], torch.Tensor]

#: Size of the fixed probe where deterministic attacks take their first gradient (PGD._start).
PROBE = 1e-3

#: Ruiz et al.'s success criterion: an attack disrupts when MSE(G(x̂), G(x)) exceeds this.
SUCCESS_MSE = 0.05


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_number(value: float, name: str, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected a finite number {need}, got {value}")


def _check_count(value: int, name: str, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_input(x: object, c: object) -> None:
    check_images(x)
    assert isinstance(x, torch.Tensor)
    if x.numel() and (x.min() < -1 - 1e-4 or x.max() > 1 + 1e-4):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(f"x: expected values in [-1, 1], got [{lo:.4g}, {hi:.4g}]")
    if c is not None and not isinstance(c, torch.Tensor):
        raise TypeError(f"c: expected a torch.Tensor or None, got {type(c).__name__}")
    if isinstance(c, torch.Tensor) and (c.dim() != 2 or c.shape[0] != x.shape[0]):
        raise ShapeError(f"c: expected shape [{x.shape[0]},c_dim], got {list(c.shape)}")


def _modules_of(obj: object) -> list[nn.Module]:
    """``obj`` itself when it is a module, else the modules among its attributes (a guard)."""
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    return (
        [v for v in vars(obj).values() if isinstance(v, nn.Module)]
        if hasattr(obj, "__dict__")
        else []
    )


@contextmanager
def _frozen(*objs: object) -> Iterator[None]:
    """Eval mode and frozen parameters inside, every flag exactly as before afterwards.

    Flags are saved per submodule and per parameter (a model may mix modes on purpose) and
    before anything is changed, so modules shared between G and the guard restore correctly.
    """
    modules = [m for o in objs for m in _modules_of(o)]
    training = {id(s): (s, s.training) for m in modules for s in m.modules()}
    grads = {id(p): (p, p.requires_grad) for m in modules for p in m.parameters()}
    try:
        for m in modules:
            m.eval()
            m.requires_grad_(False)
        yield
    finally:
        for s, flag in training.values():
            s.training = flag
        for p, flag in grads.values():
            p.requires_grad_(flag)


def _seed0() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _uniform(x: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """``U(-scale, scale)`` noise shaped like ``x``, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return ((2 * u - 1) * scale).to(x.device)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item MSE ``[B]``; a sum of these keeps each item's gradient independent of B."""
    check_same_shape(a, b, "G(x_adv, c), reference")
    return (a - b).pow(2).flatten(1).mean(1)


def _reference(G: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return G(x, c).detach()


def _project(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp to the L∞ ε-ball around ``x``, then to [-1, 1] (stays in the ball: x is in range)."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(-1.0, 1.0)


def _linf_ascent(
    x: torch.Tensor,
    start: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    step: float,
    steps: int,
    probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed-gradient ascent of ``objective(x_adv).sum()`` inside the ε-ball (PGD's loop).

    ``probe``: where the first gradient is taken, relative to ``start`` (see :meth:`PGD._start`).
    """
    x_adv = _project(x, start, eps).detach()
    for i in range(steps):
        x_in = (x_adv + probe if i == 0 and probe is not None else x_adv).requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_in).sum(), x_in)
        with torch.no_grad():
            x_adv = _project(x, x_adv + step * grad.sign(), eps)
    return x_adv


# --------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------


class Attack:
    """Base class: holds the generator, validates inputs, restores the model's state.

    Subclasses implement :meth:`_run`; :meth:`forward` (also reached by calling the attack)
    checks the input, freezes the modules and computes the reference output.

    Args:
        G: the generator, ``G(x, c) -> y`` on ``[B,3,H,W]`` in [-1, 1].
    """

    def __init__(self, G: nn.Module) -> None:
        if not callable(G):
            raise TypeError(f"G: expected a callable generator, got {type(G).__name__}")
        self.G = G

    def __call__(
        self, x: torch.Tensor, c: torch.Tensor | None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Same as :meth:`forward`."""
        return self.forward(x, c, *args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        *,
        reference: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attack a batch.

        Args:
            x: faces, :math:`(B, 3, H, W)` in [-1, 1].
            c: conditions, :math:`(B, c_dim)`, or ``None`` for unconditional generators.
            reference: r of Eq. 1, :math:`(B, 3, H, W)`; ``G(x, c)`` (no grad) when ``None``.
            generator: random source for random starts and EoT sampling (seeded runs).

        Returns:
            x_adv, :math:`(B, 3, H, W)` in [-1, 1], detached, same dtype and device as ``x``.
        """
        _check_input(x, c)
        x = x.detach()
        with _frozen(*self._modules()), torch.enable_grad():
            r = _reference(self.G, x, c) if reference is None else reference.detach()
            return self._run(x, c, r, generator).detach()

    def _modules(self) -> list[object]:
        return [self.G]

    def _run(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "G")
        return f"{type(self).__name__}({settings})"


class PGD(Attack):
    r"""Untargeted L∞ PGD disrupting G's output (Eq. 1), as Ruiz et al.

    Maximises :math:`\mathrm{MSE}(G(x + \delta, c), r)` subject to
    :math:`\|\delta\|_\infty \le \epsilon` and :math:`x + \delta \in [-1, 1]`, with
    :math:`r = G(x, c)` by default: from a uniform random start in the ε-ball, ``steps`` times
    ``x_adv += step * sign(grad)``, then clamp to the ε-ball and to [-1, 1].

    Args:
        G: the generator.
        eps: L∞ radius ε in [-1, 1] units (0.05 as Ruiz et al.).
        step: step size α per iteration (0.01).
        steps: iterations (10).
        random_start: start from ``x + U(-ε, ε)`` (PGD) rather than ``x`` (I-FGSM).

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1]; c: :math:`(B, c_dim)` or ``None``.
        - output: :math:`(B, 3, H, W)` in [-1, 1], :math:`\|x_{adv} - x\|_\infty \le \epsilon`.
    """

    def __init__(
        self,
        G: nn.Module,
        eps: float = 0.05,
        step: float = 0.01,
        steps: int = 10,
        random_start: bool = True,
    ) -> None:
        super().__init__(G)
        _check_number(eps, "eps")
        _check_number(step, "step")
        _check_count(steps, "steps")
        self.eps, self.step, self.steps = float(eps), float(step), steps
        self.random_start = bool(random_start)

    def _start(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The start point and, for a start at x, the probe offset of the first gradient."""
        if self.random_start:
            return x + _uniform(x, self.eps, generator), None
        # The MSE to r = G(x, c) is minimal at x, so its gradient there is exactly zero and
        # sign(0) would never move: I-FGSM takes its first gradient at a tiny fixed probe
        # (seed 0 unless a generator is given) beside x, which keeps it deterministic.
        return x.clone(), _uniform(x, PROBE, generator or _seed0())

    def _objective(
        self, c: torch.Tensor | None, r: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x_adv: _mse(self.G(x_adv, c), r)

    def _run(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        start, probe = self._start(x, generator)
        objective = self._objective(c, r)
        return _linf_ascent(x, start, objective, self.eps, self.step, self.steps, probe)


class IFGSM(PGD):
    """I-FGSM: :class:`PGD` without the random start (deterministic), as Ruiz et al.

    Args:
        G: the generator.
        eps: L∞ radius ε (0.05).
        step: step size α (0.01).
        steps: iterations (10).
    """

    def __init__(
        self, G: nn.Module, eps: float = 0.05, step: float = 0.01, steps: int = 10
    ) -> None:
        super().__init__(G, eps=eps, step=step, steps=steps, random_start=False)


class Targeted(PGD):
    r"""Targeted L∞ PGD (Eq. 2): make G's output look like a chosen image r_t.

    Minimises :math:`\mathrm{MSE}(G(x + \delta, c), r_t)` subject to
    :math:`\|\delta\|_\infty \le \epsilon` (signed-gradient descent, clamped as :class:`PGD`).
    Call as ``Targeted(G, ...)(x, c, target)``. The paper uses it against CycleGAN with the
    input image as the target.

    Args:
        G: the generator.
        eps: L∞ radius ε (0.05).
        step: step size α (0.01).
        steps: iterations (10).
        random_start: start from a uniform random point in the ε-ball (off by default).
    """

    def __init__(
        self,
        G: nn.Module,
        eps: float = 0.05,
        step: float = 0.01,
        steps: int = 10,
        random_start: bool = False,
    ) -> None:
        super().__init__(G, eps=eps, step=step, steps=steps, random_start=random_start)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        target: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attack a batch towards ``target``.

        Args:
            x: faces, :math:`(B, 3, H, W)` in [-1, 1].
            c: conditions, :math:`(B, c_dim)` or ``None``.
            target: r_t, the wanted output, same shape as ``G(x, c)``.
            generator: random source for the random start.

        Returns:
            x_adv, :math:`(B, 3, H, W)` in [-1, 1].
        """
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
        return super().forward(x, c, reference=target, generator=generator)

    def _start(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # No probe: the gradient towards a target other than G(x) does not vanish at x.
        return (x + _uniform(x, self.eps, generator) if self.random_start else x.clone()), None

    def _objective(
        self, c: torch.Tensor | None, r: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x_adv: -_mse(self.G(x_adv, c), r)


class CWL2(Attack):
    r"""Carlini–Wagner L2 adapted to image-to-image generators.

    C&W's classifier margin has no counterpart for a generator, so the adaptation keeps C&W's
    machinery and swaps the objective for the disruption of Eq. 1: optimise
    :math:`w` with Adam, :math:`\hat x = \tanh(w)` (always in [-1, 1], no clipping), and minimise
    per item

    .. math:: \overline{(\hat x - x)^2} - \mathrm{const} \cdot \mathrm{MSE}(G(\hat x, c), r)

    i.e. maximise the output distortion with an L2 penalty on the perturbation. There is no
    confidence κ (the distortion term has no hinge). The L2 term is the *mean* squared
    perturbation, not C&W's sum, so that ``const`` does not depend on the image size.

    Kept per item is the smallest-L2 iterate whose output MSE exceeds ``threshold`` (Ruiz et
    al.'s success criterion, 0.05); an item that never gets there keeps its most disruptive
    iterate instead of falling back to ``x`` as C&W does, so the attack always returns its best
    try. With ``binary_steps > 1`` the constant is binary-searched per item as in C&W: halved
    towards the last success, multiplied by 10 while there is none yet.

    Args:
        G: the generator.
        const: initial trade-off constant (larger: more disruption, larger perturbation).
        steps: Adam iterations per binary-search step.
        lr: Adam learning rate in tanh space.
        binary_steps: binary-search steps on ``const`` (1: no search).
        threshold: output MSE that counts as success (0.05).
    """

    def __init__(
        self,
        G: nn.Module,
        const: float = 1.0,
        steps: int = 100,
        lr: float = 0.01,
        binary_steps: int = 1,
        threshold: float = SUCCESS_MSE,
    ) -> None:
        super().__init__(G)
        _check_number(const, "const", positive=True)
        _check_count(steps, "steps")
        _check_number(lr, "lr", positive=True)
        _check_count(binary_steps, "binary_steps", minimum=1)
        _check_number(threshold, "threshold")
        self.const, self.steps, self.lr = float(const), steps, float(lr)
        self.binary_steps, self.threshold = binary_steps, float(threshold)

    def _run(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        b = x.shape[0]
        # Start from a tiny fixed probe: at x itself both terms have zero gradient (see PGD).
        start = x + _uniform(x, PROBE, generator or _seed0())
        w0 = torch.atanh(start.clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((b,), self.const, dtype=x.dtype, device=x.device)
        lo = torch.zeros_like(const)
        hi = torch.full_like(const, math.inf)
        best_x = x.clone()
        best_l2 = torch.full_like(const, math.inf)
        best_dist = torch.full_like(const, -math.inf)
        best_ok = torch.zeros(b, dtype=torch.bool, device=x.device)
        for _ in range(self.binary_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            ok_now = torch.zeros_like(best_ok)
            for i in range(self.steps + 1):
                x_hat = torch.tanh(w)
                l2 = (x_hat - x).pow(2).flatten(1).mean(1)
                dist = _mse(self.G(x_hat, c), r)
                # Book-keeping on the iterate just evaluated (the last pass only evaluates).
                with torch.no_grad():
                    ok = dist > self.threshold
                    better = (ok & (~best_ok | (l2 < best_l2))) | (
                        ~ok & ~best_ok & (dist > best_dist)
                    )
                    best_x[better] = x_hat[better].detach()
                    best_l2[better], best_dist[better] = l2[better], dist[better]
                    best_ok |= ok
                    ok_now |= ok
                if i == self.steps:
                    break
                (grad,) = torch.autograd.grad((l2 - const * dist).sum(), w)
                w.grad = grad
                opt.step()
            # C&W's search on the constant: success -> smaller, failure -> larger.
            hi = torch.where(ok_now, torch.minimum(hi, const), hi)
            lo = torch.where(ok_now, lo, torch.maximum(lo, const))
            const = torch.where(hi.isinf(), const * 10, (lo + hi) / 2)
        return best_x.clamp(-1.0, 1.0)


class AdaptivePGD(PGD):
    r"""Defence-aware L∞ PGD through the guard's own transforms (Eq. 3, EoT + BPDA).

    Maximises, by signed-gradient ascent in the ε-ball,

    .. math:: \frac{1}{|S|}\sum_{k \in S} \mathrm{MSE}(G(f_k(x + \delta), c), r)
              \; - \; \lambda_e \, S_{final}(x + \delta)

    where each step draws ``eot_samples`` transforms :math:`f_k` (Expectation over
    Transformation) from the pool: the identity (the guard passes inputs it does not flag
    unchanged), the guard's K consistency transforms (``guard.profile.consistency``) and its
    Rec-Net candidates (``guard.profile.recnet_transforms()``). Non-differentiable transforms
    (JPEG, median) are run forward and differentiated as the identity (BPDA, via
    :func:`magdr.transforms.bpda_apply`). :math:`\lambda_e` = ``evade_weight`` > 0 also pushes
    the guard's score :math:`S_{final}` (Eq. 9) down to evade the detector.

    The paper writes Eq. 3 with :math:`f_k` applied to G's output; a pre-processing defence acts
    on G's *input*, so this follows the adaptive-attack literature it cites and transforms the
    input.

    Args:
        G: the generator.
        guard: an object with ``.profile.consistency``, ``.profile.recnet_transforms()`` and
            ``.score(x, c) -> [B]`` (a :class:`magdr.Guard`); optional when ``transforms`` is
            given and ``evade_weight == 0``.
        eps: L∞ radius ε (0.05).
        step: step size α (0.01).
        steps: iterations (the paper sweeps 10 to 200).
        eot_samples: transforms drawn per step; ``None`` uses the whole pool every step (the
            exact sum of Eq. 3).
        evade_weight: λ_e ≥ 0, weight of the detector-evasion term (0: Eq. 3 as written).
        transforms: the pool instead of the guard's: ``{"name", "params"}`` dicts naming
            :data:`magdr.transforms.REGISTRY` entries, or callables ``x -> x'`` (a callable
            whose output carries no gradient is differentiated as the identity, BPDA).
        include_identity: put the identity in the pool.
        random_start: start from a uniform random point in the ε-ball.
    """

    def __init__(
        self,
        G: nn.Module,
        guard: object | None = None,
        eps: float = 0.05,
        step: float = 0.01,
        steps: int = 50,
        eot_samples: int | None = 4,
        evade_weight: float = 0.0,
        transforms: Sequence[TransformSpec] | None = None,
        include_identity: bool = True,
        random_start: bool = True,
    ) -> None:
        super().__init__(G, eps=eps, step=step, steps=steps, random_start=random_start)
        if eot_samples is not None:
            _check_count(eot_samples, "eot_samples", minimum=1)
        _check_number(evade_weight, "evade_weight")
        if guard is None and transforms is None:
            raise ValueError("adaptive attack: give a guard or a transforms list")
        if evade_weight > 0 and not callable(getattr(guard, "score", None)):
            raise ValueError("evade_weight > 0 needs a guard with a score(x, c) method")
        self.guard = guard
        self.eot_samples, self.evade_weight = eot_samples, float(evade_weight)
        self.include_identity = bool(include_identity)
        self.pool: list[TransformSpec] = self._pool(transforms)

    def _pool(self, transforms: Sequence[TransformSpec] | None) -> list[TransformSpec]:
        if transforms is None:
            profile = getattr(self.guard, "profile", None)
            if profile is None:
                raise ValueError("guard: expected a .profile with the guard's transforms")
            transforms = list(getattr(profile, "consistency", []))
            rec = getattr(profile, "recnet_transforms", None)
            transforms += list(rec()) if callable(rec) else []
        pool: list[TransformSpec] = []
        seen: set[str] = set()
        for t in transforms:
            if isinstance(t, dict):
                if "name" not in t:
                    raise ValueError(f"transforms: expected {{'name', 'params'}} dicts, got {t}")
                key = repr((t["name"], sorted(dict(t.get("params") or {}).items())))
                if key in seen:  # the same f_k in both lists: count it once
                    continue
                seen.add(key)
            elif not callable(t):
                raise TypeError(
                    f"transforms: expected a dict or a callable, got {type(t).__name__}"
                )
            pool.append(t)
        if self.include_identity:
            pool.insert(0, _identity)
        if not pool:
            raise ValueError("adaptive attack: the transform pool is empty")
        return pool

    def _modules(self) -> list[object]:
        return [self.G, self.guard]

    def _draw(self, generator: torch.Generator | None) -> list[TransformSpec]:
        if self.eot_samples is None:
            return self.pool
        device = generator.device if generator is not None else "cpu"
        idx = torch.randint(len(self.pool), (self.eot_samples,), generator=generator, device=device)
        return [self.pool[i] for i in idx.tolist()]

    def _run(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            fs = self._draw(generator)
            loss = sum(_mse(self.G(_apply(f, x_adv), c), r) for f in fs) / len(fs)
            if self.evade_weight > 0:
                score = self.guard.score(x_adv, c)  # type: ignore[union-attr]
                loss = loss - self.evade_weight * score.reshape(x.shape[0])
            return loss  # type: ignore[return-value]

        start, probe = self._start(x, generator)
        return _linf_ascent(x, start, objective, self.eps, self.step, self.steps, probe)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _apply(f: TransformSpec, x: torch.Tensor) -> torch.Tensor:
    """Run one pool transform with BPDA: true gradient if differentiable, else the identity's."""
    if isinstance(f, dict):
        from magdr import transforms  # lazy: only the adaptive attack needs the registry

        return transforms.bpda_apply(f["name"], x, **dict(f.get("params") or {}))
    y = f(x)
    if not y.requires_grad:  # a non-differentiable callable: straight-through (BPDA)
        y = x + (y.to(x) - x).detach()
    return y


# --------------------------------------------------------------------------------------------
# Functions (DESIGN §3): thin wrappers that build the class and call it once.
# --------------------------------------------------------------------------------------------


def pgd(
    G: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    eps: float = 0.05,
    step: float = 0.01,
    steps: int = 10,
    random_start: bool = True,
    *,
    reference: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L∞ PGD (Eq. 1), Ruiz et al.'s defaults. See :class:`PGD`.

    Returns:
        x_adv, :math:`(B, 3, H, W)` in [-1, 1], within ε of ``x`` in L∞.
    """
    attack = PGD(G, eps=eps, step=step, steps=steps, random_start=random_start)
    return attack(x, c, reference=reference, generator=generator)


def ifgsm(
    G: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    eps: float = 0.05,
    step: float = 0.01,
    steps: int = 10,
    *,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """I-FGSM: PGD without random start, deterministic. See :class:`IFGSM`.

    Returns:
        x_adv, :math:`(B, 3, H, W)` in [-1, 1], within ε of ``x`` in L∞.
    """
    return IFGSM(G, eps=eps, step=step, steps=steps)(x, c, reference=reference)


def targeted(
    G: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    target: torch.Tensor,
    eps: float = 0.05,
    step: float = 0.01,
    steps: int = 10,
    random_start: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Targeted L∞ PGD (Eq. 2): minimise MSE(G(x̂, c), target). See :class:`Targeted`.

    Returns:
        x_adv, :math:`(B, 3, H, W)` in [-1, 1], within ε of ``x`` in L∞.
    """
    attack = Targeted(G, eps=eps, step=step, steps=steps, random_start=random_start)
    return attack(x, c, target, generator=generator)


def cw_l2(
    G: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    const: float = 1.0,
    steps: int = 100,
    lr: float = 0.01,
    binary_steps: int = 1,
    threshold: float = SUCCESS_MSE,
    *,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Carlini–Wagner L2 adapted to image-to-image models. See :class:`CWL2`.

    Returns:
        x_adv, :math:`(B, 3, H, W)` in [-1, 1] (no L∞ bound: the L2 penalty keeps it small).
    """
    attack = CWL2(G, const=const, steps=steps, lr=lr, binary_steps=binary_steps,
                  threshold=threshold)  # fmt: skip
    return attack(x, c, reference=reference)


def adaptive_pgd(
    G: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    guard: object | None = None,
    eps: float = 0.05,
    step: float = 0.01,
    steps: int = 50,
    eot_samples: int | None = 4,
    evade_weight: float = 0.0,
    *,
    transforms: Sequence[TransformSpec] | None = None,
    include_identity: bool = True,
    random_start: bool = True,
    reference: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adaptive PGD through the guard's transforms (Eq. 3, EoT + BPDA). See :class:`AdaptivePGD`.

    Returns:
        x_adv, :math:`(B, 3, H, W)` in [-1, 1], within ε of ``x`` in L∞.
    """
    attack = AdaptivePGD(
        G, guard=guard, eps=eps, step=step, steps=steps, eot_samples=eot_samples,
        evade_weight=evade_weight, transforms=transforms, include_identity=include_identity,
        random_start=random_start,
    )  # fmt: skip
    return attack(x, c, reference=reference, generator=generator)
