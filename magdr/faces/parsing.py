"""Face parsers: face crops -> 19 soft class maps in BiSeNet / CelebAMask-HQ order (DESIGN §5).

Every parser is a :class:`FaceParser`: ``P(x)`` with ``x`` :math:`(B, 3, H, W)` in [-1, 1]
returns :math:`(B, 19, H, W)` class probabilities (softmax over dim 1) at the input's
resolution, in the order of :data:`magdr.faces.regions.BISENET_CLASSES`. Each parser works at
a fixed internal size (BiSeNet 512, ParseNet 128, landmarks 256) and does its own resizing and
normalisation. :func:`magdr.faces.regions.group_regions` turns the output into MagDR's
attribute regions M_i (paper §3.2.1).

- :class:`BiSeNet`: the parser used by the paper, in the exact key layout of zllrunning's
  face-parsing.PyTorch ``79999_iter.pth`` (ResNet-18 context path, ImageNet normalisation).
- :class:`ParseNetParser`: the small default network shipped in ``magdr/models/weights``.
- :class:`LandmarkParser`: no learning: polygons from dlib's 68 face landmarks (brows, eyes,
  nose, lips, mouth, skin); hair, ears, neck and clothes are not located and count as background.

:func:`load_parser` picks one by name or loads a checkpoint file (``weights_only=True``, strict
keys). Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magdr.check import check_images
from magdr.checkpoints import (
    WEIGHTS_DIR,
    CheckpointError,
    load_strict,
    read_state_dict,
    resolve_device,
)
from magdr.faces.regions import BISENET_CLASSES

NUM_CLASSES = len(BISENET_CLASSES)
DEFAULT_WEIGHTS = WEIGHTS_DIR / "parser.pt"
#: Where dlib's 68-point landmark model is looked for (Debian's ``libdlib-data``).
DLIB_LANDMARKS = Path("/usr/share/dlib/shape_predictor_68_face_landmarks.dat")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize; antialiased when shrinking. Weights sum to 1, so probabilities stay so."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if shrink and x.dtype not in (torch.float32, torch.float64):
        # The CPU's antialiased kernel has no bfloat16 (the daemon's parser under autocast on
        # AVX-512 BF16 machines): resize those probabilities in float32.
        y = F.interpolate(
            x.float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )
        return y.to(x.dtype)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class FaceParser(nn.Module):
    """Base class: ``P(x)`` -> per-pixel probabilities of the 19 BiSeNet classes.

    Subclasses set :attr:`size` and implement :meth:`parse` at that size; :meth:`forward` resizes
    the input there and the probabilities back. The output is differentiable w.r.t. ``x`` for
    the network parsers (not for :class:`LandmarkParser`).

    Shape:
        - x: :math:`(B, 3, H, W)` in [-1, 1], RGB, face crops framed like CelebA's.
        - output: :math:`(B, 19, H, W)`, non-negative, summing to 1 over dim 1.
    """

    #: Side of the square resolution the parser works at.
    size: int = 128

    def parse(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities :math:`(B, 19, S, S)` of ``x`` :math:`(B, 3, S, S)` in [-1, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_images(x)
        h, w = x.shape[-2:]
        p = self.parse(_resize(x, (self.size, self.size)))
        return _resize(p, (h, w))


# --------------------------------------------------------------------------------------------
# BiSeNet (zllrunning/face-parsing.PyTorch, 79999_iter.pth)
# --------------------------------------------------------------------------------------------


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    """ResNet basic block; keys ``conv1 bn1 conv2 bn2 [downsample.0 downsample.1]``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(s + r)


class _ResNet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_BasicBlock(64, 64), _BasicBlock(64, 64))
        self.layer2 = nn.Sequential(_BasicBlock(64, 128, 2), _BasicBlock(128, 128))
        self.layer3 = nn.Sequential(_BasicBlock(128, 256, 2), _BasicBlock(256, 256))
        self.layer4 = nn.Sequential(_BasicBlock(256, 512, 2), _BasicBlock(512, 512))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: D102
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class _ARM(nn.Module):
    """Attention refinement: features scaled by a channel attention from their global mean."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        f = self.conv(x)
        a = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(f, 1))))
        return f * a


class _ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _ARM(256, 128)
        self.arm32 = _ARM(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128)
        self.conv_head16 = _ConvBNReLU(128, 128)
        self.conv_avg = _ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: D102
        f8, f16, f32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
        up32 = F.interpolate(self.arm32(f32) + avg, f16.shape[-2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(f16) + up32, f8.shape[-2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return f8, up16, up32


class _FFM(nn.Module):
    """Feature fusion: 1×1 conv of both paths, plus a squeeze-excitation style re-weighting."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:  # noqa: D102
        f = self.convblk(torch.cat([fsp, fcp], 1))
        a = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(f, 1)))))
        return f + f * a


class _Output(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv_out(self.conv(x))


class BiSeNet(FaceParser):
    """BiSeNet face parser in the key layout of face-parsing.PyTorch's ``79999_iter.pth``.

    The spatial path is the ResNet's 1/8 feature (as in that repository); the context path
    refines the 1/16 and 1/32 features with attention; ``conv_out16``/``conv_out32`` are the
    training-only auxiliary heads (kept so the checkpoint loads strictly). Input: 512×512,
    ImageNet-normalised RGB in [0, 1]; :meth:`forward` takes care of both.

    Args:
        n_classes: output classes (19 for CelebAMask-HQ).

    Example:
        >>> P = BiSeNet().eval()
        >>> P.net(torch.zeros(1, 3, 64, 64))[0].shape
        torch.Size([1, 19, 64, 64])
    """

    size = 512

    def __init__(self, n_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FFM(256, 256)
        self.conv_out = _Output(256, 256, n_classes)
        self.conv_out16 = _Output(128, 64, n_classes)
        self.conv_out32 = _Output(128, 64, n_classes)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)

    def net(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original ``BiSeNet.forward``: normalised images -> (main, aux16, aux32) logits."""
        h, w = x.shape[-2:]
        f8, cp8, cp16 = self.cp(x)
        fuse = self.ffm(f8, cp8)
        outs = (self.conv_out(fuse), self.conv_out16(cp8), self.conv_out32(cp16))
        return tuple(  # type: ignore[return-value]
            F.interpolate(o, (h, w), mode="bilinear", align_corners=True) for o in outs
        )

    def parse(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xn = ((x + 1) / 2 - self.mean) / self.std
        return self.net(xn)[0].softmax(1)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], source: str = "state dict") -> BiSeNet:
        """A BiSeNet loaded strictly from a ``79999_iter.pth``-layout state dict."""
        try:
            n = sd["conv_out.conv_out.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"{source}: not a BiSeNet layout (no {e})") from None
        return load_strict(cls(n), sd, source, "BiSeNet (79999_iter.pth)")


# --------------------------------------------------------------------------------------------
# ParseNet (the shipped default)
# --------------------------------------------------------------------------------------------


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with each ``Conv2d`` → ``BatchNorm2d`` pair folded into one.

    The batch norm becomes the conv's scale and bias (pairs inside ``nn.Sequential`` only).
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(net).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return out


class ParseNetParser(FaceParser):
    """The small default U-Net :class:`magdr.faces.parsenet.ParseNet` as a :class:`FaceParser`.

    Args:
        net: a ParseNet (logits at its 128×128 working size).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        from magdr.faces import parsenet

        self.size = parsenet.WORK_SIZE
        self.net = net
        self._drop_folded()

    def parse(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training or torch.is_grad_enabled():
            return self.net(x).softmax(1)
        # Inference runs a copy with each batch norm folded into its conv, in channels-last
        # memory: the same function (to float rounding) at about half the CPU time (oneDNN's
        # convolutions then skip a layout reorder per layer), on every face the guard sees.
        if self.__dict__["_folded"] is None:
            net = fold_batch_norms(self.net).to(memory_format=torch.channels_last)
            self.__dict__["_folded"] = net
        x = x.contiguous(memory_format=torch.channels_last)
        return self.__dict__["_folded"](x).softmax(1).contiguous()

    def _drop_folded(self) -> None:
        # Kept outside the module tree, so the state dict and .to() see only ``net``.
        self.__dict__["_folded"] = None

    def train(self, mode: bool = True) -> ParseNetParser:  # noqa: D102
        self._drop_folded()
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ParseNetParser:
        self._drop_folded()  # .to(), .float(), ...: fold again from the moved weights
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        self._drop_folded()
        return super().load_state_dict(*args, **kwargs)

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> ParseNetParser:
        """A ParseNet parser whose width and depth are read from ``sd``, loaded strictly."""
        from magdr.faces.parsenet import ParseNet

        try:
            net = ParseNet.from_state_dict(dict(sd))
        except (KeyError, IndexError) as e:
            raise CheckpointError(f"{source}: not a ParseNet layout (no {e})") from None
        except RuntimeError as e:  # load_state_dict(strict=True) lists the bad keys
            msg = " ".join(str(e).split())
            raise CheckpointError(
                f"{source}: keys do not match the ParseNet layout: {msg}"
            ) from None
        return cls(net)


# --------------------------------------------------------------------------------------------
# Landmark parser (dlib 68 points)
# --------------------------------------------------------------------------------------------


def find_landmark_model() -> Path | None:
    """Path of dlib's ``shape_predictor_68_face_landmarks.dat``, or ``None``.

    Looks in Debian's ``libdlib-data`` location, then in the ``face_recognition_models`` package.
    """
    if DLIB_LANDMARKS.is_file():
        return DLIB_LANDMARKS
    try:
        import face_recognition_models  # type: ignore[import-not-found]

        p = Path(face_recognition_models.pose_predictor_model_location())
        return p if p.is_file() else None
    except ImportError:
        return None


def landmarks_available() -> bool:
    """Whether :class:`LandmarkParser` can be built here (dlib and its 68-point model)."""
    try:
        import dlib  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return find_landmark_model() is not None


def dlib_shape_predictor(
    model_path: str | os.PathLike[str] | None, needed_by: str
) -> tuple[Any, Any, Path]:
    """dlib, its 68-point shape predictor and the model's path.

    Args:
        model_path: ``shape_predictor_68_face_landmarks.dat``; None: :func:`find_landmark_model`.
        needed_by: what needs them, for the error message.

    Raises:
        FileNotFoundError: dlib or the model is missing (the message says how to get them).
    """
    try:
        import dlib  # type: ignore[import-not-found]
    except ImportError as e:
        raise FileNotFoundError(
            f"{needed_by} needs dlib: pip install 'magdr-guard[dlib]' (dlib-bin)"
        ) from e
    path = Path(model_path) if model_path is not None else find_landmark_model()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"dlib's 68-point landmark model not found{f' at {path}' if path else ''}: "
            f"install Debian's libdlib-data (-> {DLIB_LANDMARKS}) or "
            "`pip install face-recognition-models`, or pass model_path"
        )
    return dlib, dlib.shape_predictor(str(path)), path


#: dlib face box (left, top, right, bottom) expected in a CelebA-framed crop, as fractions of
#: the side: the median over 200 CelebA training crops. Used when dlib finds no face.
_FALLBACK_BOX = (0.254, 0.363, 0.738, 0.848)

# Classes drawn from the 68 iBUG points, highest priority first: a pixel covered by several
# polygons (after blurring) belongs mostly to the first. "l_"/"r_" follow image left/right.
_LIPS_OUT_U, _LIPS_IN_U = [48, 49, 50, 51, 52, 53, 54], [64, 63, 62, 61, 60]
_LIPS_OUT_L, _LIPS_IN_L = [54, 55, 56, 57, 58, 59, 48], [60, 67, 66, 65, 64]


def _polygons(p: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Class polygons from 68 landmarks ``p`` :math:`(68, 2)`, float pixels."""
    chin, brow_mid = p[8], (p[19] + p[24]) / 2
    up = brow_mid - chin
    face_len = float(np.linalg.norm(up)) + 1e-6
    up /= face_len
    side = np.array([-up[1], up[0]])  # perpendicular to the face's vertical axis
    width = float(np.linalg.norm(p[16] - p[0]))
    brow_t = 0.07 * width  # dlib's brow points trace the brow's upper edge

    def brow(idx: list[int]) -> np.ndarray:
        q = p[idx]
        return np.concatenate([q, q[::-1] - up * brow_t])

    bridge = [p[27] + s * side * 0.06 * width for s in (-1, 1)]
    bridge += [p[29] + s * side * 0.09 * width for s in (-1, 1)]
    nose = cv2.convexHull(np.concatenate([p[27:36], np.array(bridge)]).astype(np.float32))
    forehead = p[17:27] + up * 0.35 * face_len
    skin = cv2.convexHull(np.concatenate([p[0:17], forehead]).astype(np.float32))
    return [
        ("mouth", p[60:68]),
        ("u_lip", p[_LIPS_OUT_U + _LIPS_IN_U]),
        ("l_lip", p[_LIPS_OUT_L + _LIPS_IN_L]),
        ("l_eye", p[36:42]),
        ("r_eye", p[42:48]),
        ("l_brow", brow([17, 18, 19, 20, 21])),
        ("r_brow", brow([22, 23, 24, 25, 26])),
        ("nose", nose[:, 0]),
        ("skin", skin[:, 0]),
    ]


def rasterize_landmarks(points: np.ndarray, size: int, blur: float = 1.5) -> np.ndarray:
    """Soft 19-class probabilities from 68 landmarks (polygons, blurred edges).

    Each class's polygon mask m_k is drawn anti-aliased and blurred; classes are stacked in
    priority order, ``p_k = m_k · Π_{j<k} (1 - m_j)``, and the background takes the rest, so the
    maps sum to 1 exactly.

    Args:
        points: :math:`(68, 2)` iBUG-order landmarks in pixels of a ``size``×``size`` image.
        size: side of the output.
        blur: Gaussian sigma of the soft edges, in pixels at 256 (scaled with ``size``).

    Returns:
        ``float32`` :math:`(19, size, size)`.
    """
    probs = np.zeros((NUM_CLASSES, size, size), np.float32)
    rest = np.ones((size, size), np.float32)
    sigma = max(blur * size / 256, 0.1)
    shift = 4  # fixed-point bits for sub-pixel polygon vertices
    for name, poly in _polygons(np.asarray(points, np.float64)):
        canvas = np.zeros((size, size), np.uint8)
        pts = np.rint(poly * (1 << shift)).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
        m = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), sigma)
        k = BISENET_CLASSES.index(name)
        probs[k] = m * rest
        rest -= probs[k]
    probs[BISENET_CLASSES.index("background")] = rest
    return probs


class LandmarkParser(FaceParser):
    """Face parser from dlib's 68 landmarks: brows, eyes, nose, lips, mouth and skin polygons.

    Uses dlib's HOG face detector at 256×256 (if it finds no face, the box where faces sit in a
    CelebA-framed crop), the 68-point shape predictor, then :func:`rasterize_landmarks`. Hair,
    ears, neck and clothes are not located: they come out as background. Not differentiable.

    Args:
        model_path: ``shape_predictor_68_face_landmarks.dat``; default: :func:`find_landmark_model`.

    Raises:
        FileNotFoundError: dlib or the landmark model is missing (the message says how to get it).
    """

    size = 256

    def __init__(self, model_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        dlib, self._predictor, self.model_path = dlib_shape_predictor(model_path, "LandmarkParser")
        self._detector = dlib.get_frontal_face_detector()
        self._rect = dlib.rectangle

    def landmarks(self, img: np.ndarray) -> np.ndarray:
        """68 landmarks :math:`(68, 2)` of the largest face in an RGB ``uint8`` image."""
        s = img.shape[0]
        dets = self._detector(img, 0)
        if len(dets):
            box = max(dets, key=lambda d: d.width() * d.height())
        else:
            box = self._rect(*(round(f * s) for f in _FALLBACK_BOX))
        shape = self._predictor(img, box)
        return np.array([(q.x, q.y) for q in shape.parts()], np.float64)

    @torch.no_grad()
    def parse(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        imgs = imgs.permute(0, 2, 3, 1).cpu().numpy()
        points = [self.landmarks(np.ascontiguousarray(im)) for im in imgs]
        out = np.stack([rasterize_landmarks(q, self.size) for q in points])
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def sniff_parser(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``"bisenet"``, ``"parsenet"`` or ``None`` from a state dict's keys."""
    if "cp.resnet.conv1.weight" in sd:
        return "bisenet"
    if "enc.0.0.weight" in sd and "head.weight" in sd:
        return "parsenet"
    return None


def load_parser(
    name_or_path: str | os.PathLike[str] = "default", device: str | torch.device = "cpu"
) -> FaceParser:
    """A ready face parser (eval mode, frozen weights) by name or checkpoint path.

    Args:
        name_or_path: ``"default"`` (the shipped ParseNet weights ``models/weights/parser.pt``,
            else the landmark parser when dlib and its model are installed), ``"landmarks"``,
            a ``.dat`` dlib landmark model, or a checkpoint in the BiSeNet ``79999_iter.pth``
            or ParseNet layout (recognised from its keys).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Raises:
        FileNotFoundError: the named weights or models are not installed.
        CheckpointError: the file is not a plain weights file or its keys match no layout.
    """
    name = str(name_or_path)
    parser: FaceParser
    if name == "default":
        if DEFAULT_WEIGHTS.is_file():
            return load_parser(DEFAULT_WEIGHTS, device)
        if not landmarks_available():
            raise FileNotFoundError(
                f"no default face parser: {DEFAULT_WEIGHTS} is missing (train it with "
                "`python -m training.parser`), and the landmark fallback needs dlib "
                f"(pip install 'magdr-guard[dlib]') plus its 68-point model (Debian's "
                f"libdlib-data -> {DLIB_LANDMARKS}, or `pip install face-recognition-models`)"
            )
        parser = LandmarkParser()
    elif name == "landmarks":
        parser = LandmarkParser()
    elif name.endswith(".dat"):
        parser = LandmarkParser(name)
    else:
        sd = read_state_dict(name, "parser checkpoint")
        kind = sniff_parser(sd)
        if kind == "bisenet":
            parser = BiSeNet.from_state_dict(sd, name)
        elif kind == "parsenet":
            parser = ParseNetParser.from_state_dict(sd, name)
        else:
            raise CheckpointError(
                f"{name}: not a known parser layout (BiSeNet 79999_iter.pth: cp.resnet.*, "
                f"ParseNet: enc.*/head.*); first keys {sorted(sd)[:5]}"
            )
    parser.eval().requires_grad_(False)
    return parser.to(resolve_device(device))
