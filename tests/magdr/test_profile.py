"""The calibrated profile and its JSON form."""

from __future__ import annotations

import json

import pytest

from magdr.profile import DEFAULT_PROFILE, Profile, RecNetSettings, load_profile
from magdr.transforms import REGISTRY


def _custom() -> Profile:
    return Profile(
        name="test",
        distances=["l1", "dssim"],
        mu=[0.1, 0.2],
        sigma=[0.01, 0.02],
        w=[0.6, 0.4],
        lam=0.5,
        threshold=0.125,
        reference={"name": "median", "params": {"k": 3}},
        consistency=[{"name": "jpeg", "params": {"quality": 60}}],
        cons_distance="l1",
        recnet=RecNetSettings(
            layers=[["median"], ["jpeg", "bitdepth"]],
            pretrained=[
                [{"name": "median", "params": {"k": 3}}],
                [
                    {"name": "jpeg", "params": {"quality": 85}},
                    {"name": "bitdepth", "params": {"bits": 5}},
                ],
            ],
            max_rounds=1,
        ),
        meta={"auroc_train": 0.9, "nested": {"a": [1, 2]}},
    )


class TestJSON:
    def test_round_trip(self, tmp_path):
        p = _custom()
        path = tmp_path / "profile.json"
        p.save(path)
        assert not list(tmp_path.glob("*.tmp"))  # written through a temporary name
        assert json.loads(path.read_text())["version"] == 1
        q = Profile.load(path)
        assert q == p
        assert isinstance(q.recnet, RecNetSettings)
        assert q.recnet.q_layers() == p.recnet.pretrained

    def test_default_round_trip(self):
        p = Profile()
        assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p

    def test_reference_absent_means_absolute_distances(self):
        # Profiles written before the per-face benchmark keep their meaning.
        d = _custom().to_dict()
        del d["reference"]
        assert Profile.from_dict(d).reference is None
        assert Profile().reference is None

    def test_version_absent_means_1(self):
        d = Profile().to_dict()
        del d["version"]
        assert Profile.from_dict(d) == Profile()


class TestRejects:
    def test_unknown_key(self):
        d = Profile().to_dict()
        d["treshold"] = 0.2
        with pytest.raises(ValueError, match=r"unknown keys \['treshold'\]"):
            Profile.from_dict(d)

    def test_bad_version(self):
        with pytest.raises(ValueError, match="unsupported version 2; expected 1"):
            Profile.from_dict({**Profile().to_dict(), "version": 2})

    @pytest.mark.parametrize("key", ["w", "mu", "sigma"])
    def test_wrong_length(self, key):
        with pytest.raises(ValueError, match=rf"profile\.{key}: expected 4 values"):
            Profile(**{key: [0.5, 0.5]})

    def test_unknown_distance(self):
        with pytest.raises(ValueError, match="unknown distance 'l3'"):
            Profile(distances=["l1", "l3"], mu=[0, 0], sigma=[1, 1], w=[0.5, 0.5])
        with pytest.raises(ValueError, match="unknown distance 'cosine'"):
            Profile(cons_distance="cosine")

    def test_unknown_reference_transform(self):
        with pytest.raises(KeyError, match="sharpen"):
            Profile(reference={"name": "sharpen", "params": {}})

    def test_unknown_or_no_consistency_transform(self):
        with pytest.raises(KeyError, match="unknown transform 'sharpen'.*known"):
            Profile(consistency=[{"name": "sharpen", "params": {}}])
        with pytest.raises(ValueError, match="K >= 1"):
            Profile(consistency=[])

    def test_unknown_recnet_category(self):
        with pytest.raises(KeyError, match="unknown transform 'sharpen'"):
            Profile(recnet=RecNetSettings(layers=[["median", "sharpen"]]))
        with pytest.raises(KeyError, match="unknown transform 'sharpen'"):
            Profile(recnet={"pretrained": [[{"name": "sharpen", "params": {}}]]})

    def test_unknown_patch_region(self):
        with pytest.raises(ValueError, match=r"recnet\.patches: unknown regions \['lips'\]"):
            Profile(recnet=RecNetSettings(patches=[["skin"], ["lips"]]))

    def test_load_names_the_file(self, tmp_path):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**Profile().to_dict(), "w": [1.0]}))
        with pytest.raises(ValueError, match=r"bad\.json: not a valid MagDR profile.*profile\.w"):
            Profile.load(bad)
        broken = tmp_path / "broken.json"
        broken.write_text("{not json")
        with pytest.raises(ValueError, match="broken.json"):
            Profile.load(broken)
        nested = tmp_path / "nested.json"
        nested.write_text(json.dumps({**Profile().to_dict(), "recnet": {"layerz": []}}))
        with pytest.raises(ValueError, match="nested.json.*layerz"):
            Profile.load(nested)
        with pytest.raises(ValueError, match="missing.json"):
            Profile.load(tmp_path / "missing.json")


class TestRecNet:
    def test_q_layers_default_is_grid_middle(self):
        q = Profile().recnet.q_layers()
        assert q == [
            [
                {"name": "median", "params": {"k": 5}},
                {"name": "nl_means", "params": {"h": 6.0}},
                {"name": "bilateral", "params": {"sigma_color": 0.2, "sigma_space": 1.5}},
                {"name": "gaussian_blur", "params": {"sigma": 1.1}},
            ],
            [
                {"name": "jpeg", "params": {"quality": 75}},
                {"name": "bitdepth", "params": {"bits": 5}},
                {"name": "resize", "params": {"scale": 0.7}},
                {"name": "gaussian_blur", "params": {"sigma": 1.1}},
            ],
        ]
        # A copy: editing it must not edit the registry's grids.
        q[0][0]["params"]["k"] = 99
        assert REGISTRY["median"].grid == [{"k": 3}, {"k": 5}]

    def test_q_layers_pretrained(self):
        assert _custom().recnet.q_layers() == _custom().recnet.pretrained

    def test_recnet_transforms(self):
        cands = Profile().recnet_transforms()
        cats = {c for layer in Profile().recnet.layers for c in layer}
        # Every grid point of every category once (gaussian_blur sits in both layers).
        assert len(cands) == sum(len(REGISTRY[c].grid) for c in cats) == 24
        assert {c["name"] for c in cands} == cats
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        assert {"name": "jpeg", "params": {"quality": 45}} in cands
        assert _custom().recnet_transforms() == [
            {"name": "median", "params": {"k": 3}},
            {"name": "median", "params": {"k": 5}},
            *({"name": "jpeg", "params": {"quality": q}} for q in (95, 85, 75, 60, 45)),
            *({"name": "bitdepth", "params": {"bits": b}} for b in (6, 5, 4)),
        ]


class TestLoadProfile:
    def test_instance_passes_through(self):
        p = _custom()
        assert load_profile(p) is p

    def test_default(self):
        expected = Profile.load(DEFAULT_PROFILE) if DEFAULT_PROFILE.exists() else Profile()
        assert load_profile("default") == expected == load_profile(None)

    def test_path(self, tmp_path):
        _custom().save(tmp_path / "p.json")
        assert load_profile(str(tmp_path / "p.json")) == _custom()
