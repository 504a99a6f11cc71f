"""Shared test set-up: single-threaded torch, seeded randomness, a tiny trained StarGAN and a
deterministic face parser stand-in.

The tiny models of the tests run much faster single-threaded on a busy 2-core machine, hence
``torch.set_num_threads(1)`` at import.

``tiny_stargan`` is trained here, in seconds, on synthetic "faces" (:func:`synthetic_faces`: a
fixed layout of skin, hair, eyes, brows, nose, mouth, ears, neck and background, each a smooth
random colour) to make a hair-colour edit inside the hair region (:func:`edit_target`).

Why it is also trained to stay *sensitive*: a tiny StarGAN trained only on the edit becomes a
smooth low-pass auto-encoder within ~25 Adam steps, and an L∞ PGD at Ruiz et al.'s ε = 0.05
then moves its output by MSE ≈ 0.003–0.014 only, far below their 0.05 success criterion. The
untrained network is fragile (MSE ≈ 0.06–0.12: InstanceNorm renormalises every channel, so the
random filters' response to an aligned ±ε pattern is as large as their response to the image),
but training on smooth images teaches smooth filters. Real face generators are fragile to
worst-case ε perturbations yet robust to benign processing; to give the tiny model that
property in seconds, each step also takes one FGSM direction (from a random start in the
ε-ball) and rewards the output moving away along it, while benignly processed copies (JPEG,
resize, blur) must give the clean output. After 120 steps (5–12 s on a busy 2-core CPU):
edit MSE ≈ 0.034, benign output change (MSE) ≈ 0.002–0.004, PGD (ε 0.05, step 0.01, 10 steps)
output MSE 0.15–0.28 on every face (measured over 4 training seeds).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from magdr.faces.parsing import FaceParser, landmarks_available  # noqa: E402
from magdr.faces.regions import BISENET_CLASSES  # noqa: E402
from magdr.models.stargan import StarGAN  # noqa: E402

#: Side of the synthetic faces and of the tiny generator.
SIZE = 32
_C = {name: i for i, name in enumerate(BISENET_CLASSES)}
#: Hair colours of the edit, one per hair attribute of StarGAN's CelebA set (RGB in [-1, 1]).
HAIR_COLOURS = torch.tensor([[-0.8, -0.8, -0.8], [0.8, 0.6, -0.2], [0.1, -0.3, -0.6]])
#: Benign processing the generator must be robust to (DESIGN §7's negatives).
BENIGN = [
    ("jpeg", {"quality": 75}),
    ("resize", {"scale": 0.75}),
    ("gaussian_blur", {"sigma": 0.6}),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def count_g_images(G: torch.nn.Module, fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()`` and how many images passed through ``G`` while it ran (a forward hook)."""
    calls: list[int] = []
    h = G.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        return fn(), sum(calls)
    finally:
        h.remove()


#: Skips a test where dlib or its 68-point landmark model is missing.
needs_landmarks = pytest.mark.skipif(
    not landmarks_available(), reason="dlib or its 68-point landmark model is not installed"
)


def data_dir() -> Path:
    """``$MAGDR_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("MAGDR_DATA") or Path(__file__).resolve().parents[2] / "shared/data")


# ---- a deterministic face layout -----------------------------------------------------------


def face_layout(size: int = SIZE) -> torch.Tensor:
    """BiSeNet class index of each pixel of a fixed frontal "face", :math:`(S, S)` long."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    lab = torch.full((size, size), _C["background"])
    face = (u / 0.55) ** 2 + ((v - 0.15) / 0.6) ** 2 < 1
    hair = ((u / 0.75) ** 2 + ((v + 0.15) / 0.75) ** 2 < 1) & ~face & (v < 0.2)
    lab[hair] = _C["hair"]
    lab[face] = _C["skin"]
    lab[(v > 0.75) & (u.abs() < 0.3)] = _C["neck"]
    lab[((u - 0.25).abs() < 0.1) & (v.abs() < 0.06)] = _C["l_eye"]
    lab[((u + 0.25).abs() < 0.1) & (v.abs() < 0.06)] = _C["r_eye"]
    lab[((u.abs() - 0.25).abs() < 0.12) & ((v + 0.15).abs() < 0.04)] = _C["l_brow"]
    lab[(u.abs() < 0.07) & ((v - 0.2).abs() < 0.1)] = _C["nose"]
    lab[(u.abs() < 0.2) & ((v - 0.45).abs() < 0.06)] = _C["mouth"]
    lab[((u.abs() - 0.6).abs() < 0.06) & ((v - 0.1).abs() < 0.12)] = _C["l_ear"]
    return lab


class LayoutParser(FaceParser):
    """Deterministic face parser stand-in: every face has the layout of :func:`face_layout`.

    Returns soft probabilities (0.9 on the layout's class, the rest spread evenly) at the
    input's resolution, so regions sum to 1 as a real parser's do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        lab = face_layout(x.shape[-1]).to(x.device)
        p = F.one_hot(lab, len(BISENET_CLASSES)).permute(2, 0, 1).to(x.dtype)
        p = p * 0.9 + 0.1 / len(BISENET_CLASSES)
        return p.expand(x.shape[0], -1, -1, -1).clone()


def _in_classes(lab: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    return torch.isin(lab, torch.tensor([_C[n] for n in names])).float()


def synthetic_faces(n: int, generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """``n`` smooth synthetic faces :math:`(n, 3, S, S)` in [-1, 1] with the fixed layout."""
    lab = face_layout(size)
    base = torch.rand(n, 3, 4, 4, generator=generator) * 1.2 - 0.6
    x = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False)
    skin = torch.rand(n, 3, 1, 1, generator=generator) * 0.6 - 0.1
    hair_c = torch.rand(n, 3, 1, 1, generator=generator) * 1.2 - 0.6
    face = _in_classes(lab, ("skin", "nose", "l_ear"))
    hair = _in_classes(lab, ("hair",))
    dark = _in_classes(lab, ("l_eye", "r_eye", "l_brow", "mouth"))
    x = x * (1 - face) + face * (skin + 0.2 * x)
    x = x * (1 - hair) + hair * (hair_c + 0.2 * x)
    x = x * (1 - dark) - 0.7 * dark
    x = x + 0.03 * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def synthetic_conditions(n: int, generator: torch.Generator) -> torch.Tensor:
    """Conditions :math:`(n, 5)`: one hair colour set in 3 of 4 faces, none in the rest."""
    c = torch.zeros(n, 5)
    k = torch.randint(0, 4, (n,), generator=generator)
    rows = torch.nonzero(k < 3).flatten()
    c[rows, k[rows]] = 1.0
    return c


def edit_target(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """What the tiny generator learns: the hair region blended towards the asked colour."""
    hair = _in_classes(face_layout(x.shape[-1]), ("hair",))
    colour = (c[:, :3] @ HAIR_COLOURS).view(-1, 3, 1, 1)
    m = hair * c[:, :3].sum(1).clamp(max=1).view(-1, 1, 1, 1)
    return x * (1 - m) + m * (0.3 * x + 0.7 * colour)


def train_tiny_stargan(
    steps: int = 120, batch: int = 8, eps: float = 0.05, seed: int = 0
) -> StarGAN:
    """Train the tiny StarGAN (module docstring): the edit, benign robustness, ε-sensitivity."""
    from magdr.transforms import apply

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    G = StarGAN(conv_dim=8, c_dim=5, repeat_num=1, image_size=SIZE)
    opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    for it in range(steps):
        x, c = synthetic_faces(batch, g), synthetic_conditions(batch, g)
        name, params = BENIGN[it % len(BENIGN)]
        x_benign = apply(name, x, **params)
        # One FGSM direction from a random start: where the output is most sensitive now.
        G.requires_grad_(False)
        with torch.no_grad():
            y0 = G(x, c)
        start = (x + eps * (torch.rand(x.shape, generator=g) * 2 - 1)).clamp(-1, 1)
        start.requires_grad_(True)
        (grad,) = torch.autograd.grad((G(start, c) - y0).square().sum(), start)
        x_far = (x + eps * grad.sign()).clamp(-1, 1)
        G.requires_grad_(True)
        y, y_benign, y_far = G(torch.cat([x, x_benign, x_far]), c.repeat(3, 1)).chunk(3)
        t = edit_target(x, c)
        moved = (y_far - y.detach()).square().mean((1, 2, 3)).clamp(max=0.12).mean()
        loss = (y - t).abs().mean() + (y_benign - t).abs().mean() - 2.0 * moved
        opt.zero_grad()
        loss.backward()
        opt.step()
    return G.eval().requires_grad_(False)


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture()
def rng() -> torch.Generator:
    """A seeded CPU random generator (seed 0), fresh for each test."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_stargan() -> StarGAN:
    """The tiny trained StarGAN (conv_dim 8, 1 residual block, 32 px; module docstring).

    Eval mode with frozen parameters; shared by the whole session, so do not modify it.
    """
    return train_tiny_stargan()


@pytest.fixture(scope="session")
def face_parser() -> LayoutParser:
    """The deterministic :class:`LayoutParser`."""
    return LayoutParser().eval()


@pytest.fixture(scope="session")
def make_faces() -> Callable[..., torch.Tensor]:
    """:func:`synthetic_faces` as a fixture, for test files outside ``tests/``'s package."""
    return synthetic_faces
