"""MagDR's detectors (paper §3.2.2): Eq. 4 region distances, Eq. 5 flags, Eq. 6 S_dist,
Eq. 7 S_cons, Eq. 9 S_final, and the one-call evaluation of G under the K transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from magdr.check import ShapeError
from magdr.detect import (
    Detection,
    Detector,
    consistency_score,
    distortion_flags,
    distortion_score,
    excess_distances,
    final_score,
    outputs_under_transforms,
    region_distances,
    region_presence,
    transformed_inputs,
)
from magdr.faces.regions import REGIONS, group_regions
from magdr.models.stargan import StarGAN
from magdr.profile import Profile
from magdr.transforms import apply


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


class CountingG(nn.Module):
    """Wraps a generator and counts its calls and the batch sizes it saw."""

    def __init__(self, G: nn.Module) -> None:
        super().__init__()
        self.G, self.calls = G, []
        self.image_size, self.c_dim = G.image_size, G.c_dim

    def forward(self, x, c):
        self.calls.append(x.shape[0])
        return self.G(x, c)

    def target_regions(self, c, batch=None):
        return self.G.target_regions(c, batch)


@pytest.fixture(scope="module")
def small_g() -> StarGAN:
    torch.manual_seed(0)
    return StarGAN(conv_dim=4, c_dim=5, repeat_num=1, image_size=16).eval()


TRANSFORMS = [
    {"name": "jpeg", "params": {"quality": 75}},
    {"name": "gaussian_blur", "params": {"sigma": 0.8}},
    {"name": "median", "params": {"k": 3}},
]


class TestRegionDistances:
    def test_hand_values(self):
        # Eq. 4 on a 2×2 image: region 0 is pixel (0,0), region 1 the other three pixels.
        x = torch.zeros(1, 3, 2, 2)
        y = torch.tensor([[0.4, 0.2], [-0.2, 0.0]]).expand(1, 3, 2, 2)
        regions = torch.zeros(1, 2, 2, 2)
        regions[0, 0, 0, 0] = 1
        regions[0, 1] = 1 - regions[0, 0]
        d = region_distances(x, y, regions, ["l1", "l2", "linf"])
        assert d.shape == (1, 2, 3)
        expected = torch.tensor([[[0.4, 0.16, 0.4], [0.4 / 3, 0.08 / 3, 0.2]]])
        torch.testing.assert_close(d, expected)

    def test_shape_batched(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
        regions = torch.softmax(torch.randn(2, len(REGIONS), 8, 8, generator=g), 1)
        d = region_distances(x, y, regions, ("l1", "dssim"))
        assert d.shape == (2, len(REGIONS), 2) and (d >= 0).all()

    def test_bad_input_raises(self):
        with pytest.raises(ShapeError):
            region_distances(
                torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), ["l1"]
            )
        with pytest.raises(ValueError, match="unknown distances"):
            region_distances(
                torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.ones(1, 1, 2, 2), ["l9"]
            )

    def test_presence(self):
        regions = torch.zeros(1, 3, 10, 10)
        regions[0, 0] = 1  # everywhere
        regions[0, 1, 0, 0] = 1  # 1 % of the image
        out = region_presence(regions, 0.005)
        assert out.tolist() == [[True, True, False]]
        assert region_presence(regions, 0.02).tolist() == [[True, False, False]]


class TestDistortionFlags:
    def test_cases(self):
        # Eq. 5: V_i = 1 iff max_m(d̄_i,m − d_c,m) >= 0.
        d = torch.tensor(
            [[[0.1, 0.5], [0.3, 0.1], [0.2, 0.4], [0.9, 0.9], [0.9, 0.9], [0.05, 0.05]]]
        )
        d_c = torch.tensor([[0.2, 0.4]])
        targets = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
        present = torch.tensor([[True, True, True, True, False, True]])
        v = distortion_flags(d, d_c, targets, present)
        # 0: second metric above; 1: first above; 2: both equal (>= 0 counts); 3: a target;
        # 4: absent; 5: both below.
        assert v.tolist() == [[True, True, True, False, False, False]]
        assert v.dtype == torch.bool

    def test_batched(self):
        d = torch.tensor([[[0.5]], [[0.1]]])
        v = distortion_flags(
            d, torch.tensor([[0.3], [0.3]]), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool)
        )
        assert v.tolist() == [[True], [False]]


class TestDistortionScore:
    def test_hand_value(self):
        # Eq. 6 with standardisation: mean over present non-target regions of Σ_m w_m σ(z).
        d = torch.tensor([[[0.3, 0.2], [0.1, 0.6], [5.0, 5.0]]])
        w, mu, sigma = torch.tensor([0.7, 0.3]), torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.2])
        targets = torch.tensor([[0.0, 0.0, 1.0]])
        present = torch.ones(1, 3, dtype=torch.bool)
        r0 = 0.7 * _sig((0.3 - 0.1) / 0.1) + 0.3 * _sig((0.2 - 0.2) / 0.2)
        r1 = 0.7 * _sig((0.1 - 0.1) / 0.1) + 0.3 * _sig((0.6 - 0.2) / 0.2)
        s = distortion_score(d, targets, present, w, mu, sigma)
        assert s.shape == (1,)
        assert s.item() == pytest.approx((r0 + r1) / 2, rel=1e-6)

    def test_absent_and_targets_left_out(self):
        d = torch.tensor([[[0.3], [9.0], [9.0]]])
        one = torch.ones(1)
        s = distortion_score(
            d,
            torch.tensor([[0.0, 1.0, 0.0]]),
            torch.tensor([[True, True, False]]),
            one,
            torch.zeros(1),
            one,
        )
        assert s.item() == pytest.approx(_sig(0.3))
        none = distortion_score(
            d, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), one, torch.zeros(1), one
        )
        assert none.item() == 0.0

    def test_monotone_in_distance(self):
        one = torch.ones(1)
        args = (torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), one, torch.zeros(1), one)
        lo = distortion_score(torch.tensor([[[0.1]]]), *args)
        hi = distortion_score(torch.tensor([[[0.2]]]), *args)
        assert hi > lo

    def test_gradcheck(self):
        g = torch.Generator().manual_seed(0)
        d = torch.rand(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        targets = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
        present = torch.ones(2, 4, dtype=torch.bool)
        mu, sigma = torch.full((3,), 0.4, dtype=torch.float64), torch.full((3,), 0.2).double()
        assert torch.autograd.gradcheck(
            lambda t: distortion_score(t, targets, present, w, mu, sigma), (d,)
        )


class TestConsistencyScore:
    def test_hand_value_population_std(self):
        # Constant images: L2 distances to y are 0, 0.04 and 0.16 (differences 0, 0.2, 0.4).
        y = torch.zeros(1, 3, 2, 2)
        y_k = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.2, -0.4)])[None]
        dk = [0.0, 0.04, 0.16]
        mu = sum(dk) / 3
        sigma = math.sqrt(sum((v - mu) ** 2 for v in dk) / 3)  # E over K, not K - 1
        s = consistency_score(y, y_k, "l2")
        assert s.shape == (1,)
        assert s.item() == pytest.approx(sigma, rel=1e-5)
        assert consistency_score(y, y_k, "l1").item() == pytest.approx(
            math.sqrt(sum((v - 0.2) ** 2 for v in (0.0, 0.2, 0.4)) / 3), rel=1e-5
        )

    def test_consistent_outputs_score_zero(self):
        y = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        y_k = (y + 0.3).unsqueeze(1).expand(-1, 4, -1, -1, -1)  # equal distance for every k
        torch.testing.assert_close(consistency_score(y, y_k), torch.zeros(2), atol=1e-7, rtol=0)

    def test_single_transform_is_its_distance(self):
        y, y1 = torch.zeros(1, 3, 2, 2), torch.full((1, 1, 3, 2, 2), 0.5)
        assert consistency_score(y, y1, "l2").item() == pytest.approx(0.25)

    def test_batched_items_independent(self):
        g = torch.Generator().manual_seed(1)
        y, y_k = torch.rand(3, 3, 4, 4, generator=g), torch.rand(3, 5, 3, 4, 4, generator=g)
        s = consistency_score(y, y_k)
        for i in range(3):
            torch.testing.assert_close(
                s[i : i + 1], consistency_score(y[i : i + 1], y_k[i : i + 1])
            )


class TestFinalScore:
    def test_hand_value(self):
        s = final_score(torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.3]), 2.0)
        torch.testing.assert_close(s, torch.tensor([1.1, 0.8]))
        torch.testing.assert_close(
            final_score(torch.tensor([7.0]), torch.tensor([0.2]), 0.0), torch.tensor([0.2])
        )


class TestOutputsUnderTransforms:
    def test_one_call_matches_separate(self, small_g):
        G = CountingG(small_g)
        g = torch.Generator().manual_seed(0)
        x, c = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.eye(5)[:2]
        y, y_k = outputs_under_transforms(G, x, c, TRANSFORMS)
        assert G.calls == [2 * (1 + len(TRANSFORMS))]  # exactly one call on the stacked batch
        assert y.shape == (2, 3, 16, 16) and y_k.shape == (2, 3, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(y, small_g(x, c))
            for k, t in enumerate(TRANSFORMS):
                ref = small_g(apply(t["name"], x, **t["params"]), c)
                torch.testing.assert_close(y_k[:, k], ref)
        # The f_k(x) computed once by the caller give the same outputs.
        x_k = transformed_inputs(x, TRANSFORMS)
        for k, t in enumerate(TRANSFORMS):
            torch.testing.assert_close(x_k[k], apply(t["name"], x, **t["params"]))
        with torch.no_grad():
            y2, y2_k = outputs_under_transforms(G, x, c, TRANSFORMS, x_k=x_k)
        torch.testing.assert_close(y2_k, y_k)
        torch.testing.assert_close(y2, y)

    def test_one_call_per_input_gives_the_same_outputs(self, small_g):
        G = CountingG(small_g)
        g = torch.Generator().manual_seed(1)
        x, c = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.eye(5)[:3]
        with torch.no_grad():
            y, y_k = outputs_under_transforms(G, x, c, TRANSFORMS)
            G.calls.clear()
            y1, y1_k = outputs_under_transforms(G, x, c, TRANSFORMS, stacked=False)
        assert G.calls == [3] * (1 + len(TRANSFORMS))
        torch.testing.assert_close(y1, y)
        torch.testing.assert_close(y1_k, y_k)

    def test_unconditional(self):
        G = CountingG(StarGAN(conv_dim=4, c_dim=0, repeat_num=1, image_size=16))
        x = torch.zeros(1, 3, 16, 16)
        y, y_k = outputs_under_transforms(G, x, None, TRANSFORMS[:1])
        assert G.calls == [2] and y_k.shape == (1, 1, 3, 16, 16)

    def test_differentiable_bpda(self, small_g):
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) - 0.5
        x.requires_grad_(True)
        y, y_k = outputs_under_transforms(small_g, x, torch.eye(5)[:1], TRANSFORMS, True)
        (grad,) = torch.autograd.grad(y_k.sum(), x)
        assert grad.abs().sum() > 0


class TestDetector:
    def test_fields(self, small_g, face_parser):
        det = Detector(small_g, Profile())
        x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        c = torch.eye(5)[:3]
        regions = group_regions(face_parser(x))
        targets = small_g.target_regions(c)
        with torch.no_grad():
            r = det(x, c, regions, targets)
        assert isinstance(r, Detection)
        n = len(REGIONS)
        assert r.score.shape == r.s_dist.shape == r.s_cons.shape == (3,)
        assert r.disrupted.dtype == torch.bool and r.flags.shape == (3, n)
        assert r.distances.shape == (3, n, 4) and r.output.shape == x.shape
        torch.testing.assert_close(r.score, final_score(r.s_dist, r.s_cons, Profile().lam))
        assert torch.equal(r.disrupted, r.score > Profile().threshold)
        torch.testing.assert_close(r.output, small_g(x, c))
        # Hair colour edits target the hair: it is never flagged.
        assert not r.flags[:, REGIONS.index("hair")].any()

    def test_regions_shape_checked(self, small_g):
        det = Detector(small_g, Profile())
        x = torch.zeros(2, 3, 16, 16)
        with pytest.raises(ShapeError, match="regions"):
            det(x, torch.zeros(2, 5), torch.ones(2, 3, 16, 16), torch.zeros(2, len(REGIONS)))

    def test_without_regions_only_when_lambda_is_zero(self, small_g, face_parser):
        x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        c = torch.eye(5)[:3]
        targets = small_g.target_regions(c)
        with pytest.raises(ValueError, match="λ is 0.05"):
            Detector(small_g, Profile())(x, c, None, targets)
        det = Detector(small_g, Profile(lam=0.0))
        with torch.no_grad():
            full = det(x, c, group_regions(face_parser(x)), targets)
            r = det(x, c, None, targets)
        torch.testing.assert_close(r.score, full.score)  # S_final is S_cons alone
        torch.testing.assert_close(r.s_cons, full.s_cons)
        assert r.s_dist.isnan().all() and r.distances.isnan().all() and r.excess.isnan().all()
        assert not r.flags.any() and torch.equal(r.disrupted, full.disrupted)


class TestReference:
    """S_dist benchmarked per face by G's output for a denoised copy (module docstring)."""

    REF = {"name": "median", "params": {"k": 3}}

    def _inputs(self, small_g, face_parser, b=3):
        x = torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        c = torch.eye(5)[:b]
        return x, c, group_regions(face_parser(x)), small_g.target_regions(c)

    def test_excess_is_the_difference(self):
        d, d_ref = torch.tensor([[[0.3, 0.5]]]), torch.tensor([[[0.1, 0.7]]])
        torch.testing.assert_close(excess_distances(d, d_ref), torch.tensor([[[0.2, -0.2]]]))
        assert excess_distances(d, None) is d

    def test_without_reference_excess_is_the_distances(self, small_g, face_parser):
        x, c, regions, targets = self._inputs(small_g, face_parser)
        with torch.no_grad():
            r = Detector(small_g, Profile())(x, c, regions, targets)
        assert torch.equal(r.excess, r.distances)

    def test_benchmark_is_g_on_the_reference_input(self, small_g, face_parser):
        x, c, regions, targets = self._inputs(small_g, face_parser)
        profile = Profile(reference=self.REF)
        with torch.no_grad():
            r = Detector(small_g, profile)(x, c, regions, targets)
            x_ref = apply("median", x, k=3)
            d_ref = region_distances(x_ref, small_g(x_ref, c), regions, profile.distances)
        torch.testing.assert_close(r.excess, r.distances - d_ref)
        w, mu, sigma = (torch.tensor(v) for v in (profile.w, profile.mu, profile.sigma))
        present = region_presence(regions, profile.min_region_area)
        torch.testing.assert_close(
            r.s_dist, distortion_score(r.distances - d_ref, targets, present, w, mu, sigma)
        )

    @pytest.mark.parametrize("among", [True, False])
    def test_the_reference_pair_is_read_in_one_place(self, small_g, face_parser, among):
        """``Detection.reference``: what the detector benchmarked against, for the guard's
        late S_dist too (``_Regions.get``)."""
        x, c, regions, targets = self._inputs(small_g, face_parser)
        ks = TRANSFORMS if among else TRANSFORMS[:2]  # TRANSFORMS holds the 3x3 median
        det = Detector(small_g, Profile(reference=self.REF, consistency=ks))
        with torch.no_grad():
            r = det(x, c, regions, targets)
            plain = Detector(small_g, Profile(consistency=ks))(x, c, regions, targets)
        assert r.i_ref == (TRANSFORMS.index(self.REF) if among else len(ks))
        x_ref, y_ref = r.reference()
        torch.testing.assert_close(x_ref, apply("median", x, k=3))
        torch.testing.assert_close(y_ref, small_g(x_ref, c))
        idx = torch.tensor([2, 0])
        x_some, y_some = r.reference(idx)
        assert torch.equal(x_some, x_ref[idx]) and torch.equal(y_some, y_ref[idx])
        # The distortion half from the pair gives the detection's own S_dist.
        with torch.no_grad():
            s_dist, _, _, excess = det.distortion(
                x[idx], r.output[idx], x_some, y_some, regions[idx], targets[idx]
            )
        torch.testing.assert_close(s_dist, r.s_dist[idx])
        torch.testing.assert_close(excess, r.excess[idx])
        assert plain.i_ref is None and plain.reference(idx) == (None, None)

    @pytest.mark.parametrize("among", [True, False])
    def test_one_call_of_g_and_s_cons_over_the_k_only(self, small_g, face_parser, among):
        x, c, regions, targets = self._inputs(small_g, face_parser)
        ks = TRANSFORMS if among else TRANSFORMS[:2]  # TRANSFORMS holds the 3x3 median
        G = CountingG(small_g)
        with torch.no_grad():
            r = Detector(G, Profile(reference=self.REF, consistency=ks))(x, c, regions, targets)
            plain = Detector(small_g, Profile(consistency=ks))(x, c, regions, targets)
        # One call; the reference adds a copy of the batch only when it is not an f_k.
        assert G.calls == [3 * (1 + len(ks) + (0 if among else 1))]
        torch.testing.assert_close(r.s_cons, plain.s_cons)
        torch.testing.assert_close(r.distances, plain.distances)

    def test_face_g_reconstructs_badly_everywhere_is_not_distorted(self):
        """A G that is poor on every face (here: it smooths and shifts every colour by 0.3)
        moves every region far from x; only the absolute distances call that distortion."""

        class Shifting(nn.Module):
            image_size, c_dim, attribute_targets = 16, 5, {}

            def forward(self, x, c):
                return (apply("gaussian_blur", x, sigma=2.0) + 0.3).clamp(-1, 1)

            def target_regions(self, c, batch=None):
                return torch.zeros(batch or 1, len(REGIONS))

        G = Shifting()
        # Smooth faces (gradients), which a 3x3 median leaves almost as they are.
        ramp = torch.linspace(-0.6, 0.6, 16)
        x = torch.stack([ramp[:, None].expand(16, 16), ramp[None, :].expand(16, 16)])
        x = x[:, None].expand(2, 3, 16, 16).contiguous()
        regions = torch.zeros(2, len(REGIONS), 16, 16)
        regions[:, REGIONS.index("skin"), :8] = 1
        regions[:, REGIONS.index("background"), 8:] = 1
        targets = torch.zeros(2, len(REGIONS))
        absolute = Profile(mu=[0.1, 0.01, 0.2, 0.05], sigma=[0.03, 0.01, 0.05, 0.03])
        # Clean statistics of the excess: about 0 (a clean face scores sigmoid(0) = 0.5).
        benchmarked = Profile(reference=self.REF, mu=[0.0] * 4, sigma=absolute.sigma)
        noise = 0.2 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
        with torch.no_grad():
            s_abs = Detector(G, absolute)(x, None, regions, targets).s_dist
            s_ref = Detector(G, benchmarked)(x, None, regions, targets).s_dist
            # High-frequency noise on the same faces is what the median takes out: excess.
            s_noisy = Detector(G, benchmarked)(x + noise, None, regions, targets).s_dist
        assert (s_abs > 0.9).all()  # every region far beyond the clean mean
        torch.testing.assert_close(s_ref, torch.full((2,), 0.5), atol=0.05, rtol=0)
        assert (s_noisy > 0.65).all()

    def test_differentiable(self, small_g, face_parser):
        x, c, regions, targets = self._inputs(small_g, face_parser, b=1)
        x = x.clone().requires_grad_(True)
        r = Detector(small_g, Profile(reference=self.REF))(
            x, c, regions, targets, differentiable=True
        )
        (grad,) = torch.autograd.grad(r.score.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
