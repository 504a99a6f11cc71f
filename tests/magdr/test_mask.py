from __future__ import annotations

import math

import pytest
import torch

from magdr.faces.mask import REGION_FEATHER, region_mask, window_mask
from magdr.faces.regions import REGIONS

S = 128
_R = {name: i for i, name in enumerate(REGIONS)}


def _border(m: torch.Tensor) -> torch.Tensor:
    return torch.cat([m[0], m[-1], m[:, 0], m[:, -1]])


class TestWindowMask:
    @pytest.mark.parametrize("size", [64, 128, 256])
    def test_shape_centre_border(self, size):
        m = window_mask(size)
        assert m.shape == (1, 1, size, size) and m.dtype == torch.float32
        w = m[0, 0]
        c = size // 2
        assert torch.all(w[c - 1 : c + 1, c - 1 : c + 1] > 0.999)
        assert torch.all(_border(w) == 0)
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0

    def test_symmetric(self):
        w = window_mask(S)[0, 0]
        torch.testing.assert_close(w, w.flip(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(w, w.flip(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(w, w.T, atol=1e-6, rtol=0)

    def test_radial_profile(self):
        w = window_mask(S, inner=0.3, outer=0.45)[0, 0]
        t = (torch.arange(S, dtype=torch.float32) + 0.5) / S - 0.5
        r = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
        assert torch.all(w[r <= 0.3] > 0.999)
        assert torch.all(w[r >= 0.45] == 0)
        ring = (r > 0.3) & (r < 0.45)
        assert torch.all((w[ring] > 0) & (w[ring] < 1))
        # decreasing along a ray from the centre
        row = w[S // 2, S // 2 :]
        assert torch.all(row[1:] <= row[:-1] + 1e-7)
        assert float(row[0] - row[-1]) > 0.99

    def test_cached(self):
        assert window_mask(S) is window_mask(S)
        assert window_mask(S) is not window_mask(S, inner=0.3)


def _regions(b: int = 1) -> torch.Tensor:
    """Synthetic parser regions: hair on top, skin (soft, 0.6) below it, eyes on the skin."""
    r = torch.zeros(b, len(REGIONS), S, S)
    r[:, _R["background"]] = 1.0
    r[:, :, 20:56, 30:98] = 0.0
    r[:, _R["hair"], 20:56, 30:98] = 1.0
    r[:, :, 56:112, 30:98] = 0.0
    r[:, _R["skin"], 56:112, 30:98] = 0.6
    r[:, _R["background"], 56:112, 30:98] = 0.4
    r[:, _R["skin"], 66:76, 44:60] = 0.0
    r[:, _R["background"], 66:76, 44:60] = 0.0
    r[:, _R["eyes"], 66:76, 44:60] = 1.0
    return r


def _targets(*names: str, b: int = 1) -> torch.Tensor:
    t = torch.zeros(b, len(REGIONS))
    for n in names:
        t[:, _R[n]] = 1.0
    return t


class TestRegionMask:
    # the Gaussian's reach: 2*ceil(3 sigma)+1 taps, so 0 beyond this many pixels of a region
    REACH = 7

    def test_reach(self):
        assert self.REACH == math.ceil(3 * REGION_FEATHER * S)

    def test_zero_without_target_mass(self):
        m = region_mask(_regions(), _targets("hair"))[0, 0]
        assert m.shape == (S, S)
        d = self.REACH + 1
        far = torch.ones(S, S, dtype=torch.bool)
        far[20 - d : 56 + d, 30 - d : 98 + d] = False
        assert torch.all(m[far] == 0)
        assert torch.all(m[56 + d : 112, 30:98] == 0)  # the skin below, a non-target region
        assert float(m[20:56, 30:98].max()) > 0.99  # while the hair itself is pasted

    def test_follows_the_targets(self):
        w = window_mask(S)[0, 0]
        m = region_mask(_regions(), _targets("hair", "skin"))[0, 0]
        d = self.REACH + 1
        inside = torch.zeros(S, S, dtype=torch.bool)
        inside[20 + d : 56 - d, 30 + d : 98 - d] = True  # hair interior
        inside &= w > 0.999
        assert inside.sum() > 100
        torch.testing.assert_close(m[inside], torch.ones(int(inside.sum())), atol=1e-5, rtol=0)
        skin = torch.zeros(S, S, dtype=torch.bool)
        skin[56 + d : 112 - d, 30 + d : 98 - d] = True
        skin[66 - d : 76 + d, 44 - d : 60 + d] = False  # away from the eyes
        skin &= w > 0.999
        assert skin.sum() > 100
        torch.testing.assert_close(m[skin], torch.full((int(skin.sum()),), 0.6), atol=1e-5, rtol=0)
        assert float(m[71, 52]) < 0.05  # the eyes are not a target
        # feathered: the hair's lower edge ramps instead of stepping
        col = m[40:72, 64]
        assert torch.all(col[1:] <= col[:-1] + 1e-6)
        assert ((col > 0.65) & (col < 0.95)).any()

    def test_never_above_the_window(self):
        w = window_mask(S)
        everywhere = torch.zeros(1, len(REGIONS), S, S)
        everywhere[:, _R["hair"]] = 1.0
        m = region_mask(everywhere, _targets("hair"))
        torch.testing.assert_close(m, w, atol=1e-6, rtol=0)  # the window itself
        assert torch.all(_border(m[0, 0]) == 0)
        for regions in (
            _regions(),
            torch.rand(1, len(REGIONS), S, S, generator=torch.Generator().manual_seed(0)),
        ):
            m = region_mask(regions, _targets("hair", "skin", "eyes"))
            assert torch.all(m <= w + 1e-7)
            assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0

    def test_no_targets_gives_zero(self):
        m = region_mask(_regions(2), torch.zeros(2, len(REGIONS)))
        assert m.shape == (2, 1, S, S)
        assert torch.all(m == 0)

    def test_per_face_targets(self):
        t = torch.stack([_targets("hair")[0], _targets("skin")[0]])
        m = region_mask(_regions(2), t)
        assert m.shape == (2, 1, S, S)
        assert float(m[0, 0, 38, 64]) > 0.99 and float(m[0, 0, 90, 64]) == 0
        assert float(m[1, 0, 38, 64]) == 0 and abs(float(m[1, 0, 90, 64]) - 0.6) < 1e-5

    def test_cached_window_not_modified(self):
        before = window_mask(S).clone()
        m = region_mask(_regions(), _targets("hair"))
        m.mul_(0)
        torch.testing.assert_close(window_mask(S), before, atol=0, rtol=0)
