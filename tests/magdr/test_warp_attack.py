from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from magdr.attacks import pgd
from magdr.check import ShapeError
from magdr.faces.align import unwarp, warp_faces
from magdr.faces.locate import FaceBox, crop_faces
from magdr.faces.warp_attack import (
    FramePGD,
    frame_pgd,
    jitter_matrices,
    rect_matrices,
    resize_crop,
    round_uint8,
    warp_crop,
)
from tests.conftest import data_dir
from tests.magdr.test_attacks import mse, tiny_stargan

CLIP = data_dir() / "videos" / "d0.mp4"


def _frame(h: int = 96, w: int = 120, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus fine noise: the area average and the warp both matter."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [128 + 70 * np.sin(x / 7 + p) * np.cos(y / 9 - p) for p in (0.0, 1.0, 2.0)]
    noise = np.random.default_rng(seed).normal(0, 12, (h, w, 3))
    return np.clip(np.stack(chans, -1) + noise, 0, 255).astype(np.uint8)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, np.array(shift, np.float64)[:, None]], 1)


def _tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1).float() / 127.5 - 1


def _uint8(frame: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(
        ((frame.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    )


#: shrinking (area average first), about 1:1, enlarging, and reaching past the frame's edge
MATRICES = [
    _similarity(12.0, 0.4, (-2.0, -1.0)),
    _similarity(-5.0, 0.93, (-30.0, -10.0)),
    _similarity(3.0, 1.6, (-60.0, -50.0)),
    _similarity(0.0, 0.5, (10.0, 12.0)),
]


class TestWarpCrop:
    @pytest.mark.parametrize("m", MATRICES)
    def test_matches_warp_faces(self, m):
        frame = _frame()
        ref = warp_faces(frame, m[None], 32)[0]
        got = warp_crop(_tensor(frame), m, 32)
        assert got.shape == (3, 32, 32)
        # warp_faces rounds to uint8 (mean |error| 1/4 of a level); OpenCV's fixed-point
        # bilinear weights add a little more
        assert (got - ref).abs().mean() * 127.5 < 0.5

    @pytest.mark.skipif(not CLIP.is_file(), reason="shared data clips not present")
    def test_matches_warp_faces_on_a_real_face(self):
        import av

        with av.open(str(CLIP)) as c:
            frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        # a 285-px face of d0 aligned to 128: the area average does most of the work
        m = _similarity(4.0, 0.45, (-60.0, -20.0))
        ref = warp_faces(frame, m[None], 128)[0]
        got = warp_crop(_tensor(frame), m, 128)
        assert (got - ref).abs().mean() * 127.5 < 0.5

    def test_is_differentiable(self):
        x = torch.rand(3, 12, 14, dtype=torch.float64, requires_grad=True)
        m = _similarity(10.0, 0.6, (1.0, 0.5))
        assert torch.autograd.gradcheck(lambda t: warp_crop(t, m, 6), (x,))

    def test_bad_frame_raises(self):
        with pytest.raises(ShapeError, match=r"frame: expected shape \[3,H,W\]"):
            warp_crop(torch.zeros(1, 3, 8, 8), MATRICES[0], 8)


class TestResizeCrop:
    def test_matches_crop_faces(self):
        frame = _frame()
        boxes = [FaceBox(30, 30, 40, 40, 1.0), FaceBox(-5, 60, 20, 20, 1.0)]  # one off the edge
        ref, rects = crop_faces(frame, boxes, 32)
        got = torch.stack([resize_crop(_tensor(frame), m, 32) for m in rect_matrices(rects, 32)])
        assert (got - ref).abs().max() * 127.5 <= 0.5 + 1e-3  # only the uint8 rounding

    def test_whole_frame_like_faces_frame(self):
        frame = _frame(64, 80)
        ref = cv2.resize(frame, (32, 32), interpolation=cv2.INTER_AREA)
        (m,) = rect_matrices(np.array([[0, 0, 80, 64]]), 32)
        got = _uint8(resize_crop(_tensor(frame), m, 32))
        assert np.abs(got.astype(int) - ref).max() <= 1


class TestJitter:
    def test_first_copy_is_the_matrix_and_the_rest_move_a_little(self):
        mats = np.stack(MATRICES[:2])
        out = jitter_matrices(mats, 5, 32, (2.0, 0.03, 2.0), torch.Generator().manual_seed(0))
        assert out.shape == (10, 2, 3)
        np.testing.assert_allclose(out[[0, 5]], mats)
        # a crop pixel moves at most shift + (scale + roll) * half the side, plus rounding
        centre = np.array([15.5, 15.5, 1.0])
        for i, m in enumerate(mats):
            for j in range(1, 5):
                moved = out[5 * i + j] @ np.linalg.inv(np.vstack([m, [0, 0, 1]])) @ centre
                assert np.abs(moved - centre[:2]).max() <= 2.0 + 1e-6

    def test_zero_jitter_is_the_matrix(self):
        mats = np.stack(MATRICES)
        np.testing.assert_allclose(jitter_matrices(mats, 3, 32, (0, 0, 0))[::3], mats)
        np.testing.assert_allclose(jitter_matrices(mats, 3, 32, (0, 0, 0))[1::3], mats)


def test_round_uint8_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.0, 0.0011, 0.5, 1.0], requires_grad=True)
    y = round_uint8(x)
    np.testing.assert_allclose(((y.detach() + 1) * 127.5).numpy(), [0, 128, 191, 255], atol=1e-4)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones(4))


class TestFramePGD:
    def setup_method(self):
        self.G = tiny_stargan()
        self.c = torch.zeros(1, 5)
        self.c[:, 0] = 1
        self.frame = _frame(96, 96)
        self.m = _similarity(8.0, 0.5, (-8.0, -6.0))[None]  # a 64-px face to a 32 crop

    def _recrop_mse(self, adv: np.ndarray, m: np.ndarray) -> float:
        with torch.no_grad():
            r = self.G(warp_faces(self.frame, self.m, 32), self.c)
            return mse(self.G(warp_faces(adv, m, 32), self.c), r).item()

    def test_stays_in_the_ball_and_in_the_crops_region(self):
        x = _tensor(self.frame)
        m = _similarity(0.0, 1.0, (-4.0, -4.0))[None]  # a 1:1 crop of rows/cols 4..35
        adv = FramePGD(self.G, 32, eps=0.05, step=0.01, steps=2, eot=2)(x, m, self.c)
        assert adv.shape == x.shape
        assert (adv - x).abs().max() <= 0.05 + 1e-6
        assert torch.equal(adv[:, 60:], x[:, 60:]) and torch.equal(adv[:, :, 60:], x[:, :, 60:])
        assert (adv[:, 4:36, 4:36] != x[:, 4:36, 4:36]).any()

    def test_seeded_runs_repeat_and_the_function_equals_the_class(self):
        x = _tensor(self.frame)
        kw = {"eps": 0.05, "step": 0.01, "steps": 2, "eot": 2}

        def run():
            return frame_pgd(
                self.G, x, self.m, self.c, 32, generator=torch.Generator().manual_seed(3), **kw
            )

        a = run()
        assert torch.equal(a, run())
        g = torch.Generator().manual_seed(3)
        b = FramePGD(self.G, 32, **kw)(x, self.m, self.c, generator=g)
        assert torch.equal(a, b)

    def test_survives_the_recrop_better_than_a_pasted_crop_attack(self):
        eps, steps = 0.05, 10
        x = _tensor(self.frame)
        adv = _uint8(
            FramePGD(self.G, 32, eps=eps, step=eps / 5, steps=steps, eot=4)(
                x, self.m, self.c, generator=torch.Generator().manual_seed(0)
            )
        )
        # the old path: PGD on the crop, its change warped back into the frame
        crop = warp_faces(self.frame, self.m, 32)
        g = torch.Generator().manual_seed(0)
        delta = (pgd(self.G, crop, self.c, eps, eps / 5, steps, generator=g) - crop)[0]
        part = unwarp(delta.permute(1, 2, 0).numpy() * 127.5, self.m[0], (96, 96))
        pasted = self.frame.astype(np.float32)
        pasted[part[0]] += part[1]
        pasted = np.clip(np.rint(pasted), 0, 255).astype(np.uint8)
        moved = (self.m[0] + [[0, 0, 1.0], [0, 0, -1.0]])[None]  # the landmarks moved a pixel
        ours, old = self._recrop_mse(adv, moved), self._recrop_mse(pasted, moved)
        assert ours > 1.3 * old, (ours, old)  # 0.066 against 0.042 here
        assert np.abs(adv.astype(int) - self.frame).max() <= round(eps * 127.5) + 1

    def test_ifgsm_is_deterministic_and_moves(self):
        x = _tensor(self.frame)
        att = FramePGD(self.G, 32, eps=0.05, step=0.01, steps=2, eot=1, random_start=False)
        a, b = att(x, self.m, self.c), att(x, self.m, self.c)
        assert torch.equal(a, b) and (a != x).any()

    def test_no_faces_returns_the_frame(self):
        x = _tensor(self.frame)
        out = FramePGD(self.G, 32, steps=2)(x, np.zeros((0, 2, 3)), None)
        assert torch.equal(out, x)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"eot": 0}, ValueError, "eot: expected an int >= 1"),
            ({"eps": -1.0}, ValueError, "eps"),
            ({"mode": "box"}, ValueError, "mode: expected 'warp' or 'resize'"),
            ({"jitter": (1.0, 2.0)}, ValueError, "jitter: expected"),
        ],
    )
    def test_bad_settings_raise(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            FramePGD(self.G, 32, **kwargs)

    def test_condition_rows_must_match_faces(self):
        with pytest.raises(ShapeError, match="c: expected 1 rows"):
            FramePGD(self.G, 32, steps=1)(_tensor(self.frame), self.m, torch.zeros(2, 5))
