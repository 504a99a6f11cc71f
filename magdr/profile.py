"""The calibrated profile: every number the detectors and Rec-Net need, as one JSON file.

``magdr.calibrate`` writes it; :class:`magdr.Guard` loads it (``profile="default"`` is the one
shipped beside the default weights). Keys:

- ``distances``: names of the distances in the vector D (``magdr.metrics.DISTANCES``);
- ``mu``, ``sigma``: per distance, mean and spread of clean non-target region distances (of their
  excess over the ``reference`` when there is one), used to standardise before the sigmoid of
  Eq. 6 (raw distances live on very different scales);
- ``w``: the weight vector w of Eq. 6, one weight per distance;
- ``reference``: ``{"name", "params"}`` of the input transform f_ref whose output benchmarks each
  face's region distances (``magdr.detect``'s module docstring), or ``null`` for the paper's
  absolute distances (profiles written before it existed mean ``null``);
- ``lam``: λ of Eq. 9; ``threshold``: S_final above it means *disrupted*;
- ``consistency``: the K input transforms f_k of Eq. 7, ``[{"name", "params"}, …]``;
- ``recnet``: Rec-Net's pretrained layers Q_i and search settings (Algorithm 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from magdr.checkpoints import WEIGHTS_DIR
from magdr.faces.regions import REGIONS
from magdr.metrics import DISTANCES
from magdr.transforms import get as get_transform

DEFAULT_PROFILE = WEIGHTS_DIR / "profile.json"

#: Rec-Net's candidate layers B_i: the categories each layer may use (grids from the registry).
#: Layer 1 removes the perturbation (denoisers), layer 2 squeezes what is left.
DEFAULT_LAYERS: list[list[str]] = [
    ["median", "nl_means", "bilateral", "gaussian_blur"],
    ["jpeg", "bitdepth", "resize", "gaussian_blur"],
]


#: The denoiser whose G output benchmarks S_dist per face (``calibrate --reference``'s default).
DEFAULT_REFERENCE: dict[str, Any] = {"name": "median", "params": {"k": 3}}


def default_consistency() -> list[dict[str, Any]]:
    """The K transforms of Eq. 7 a profile gets unless ``calibrate --consistency`` says."""
    # The reference first: Rec-Net's search scores with the first few f_k, and a reference
    # among them costs no extra call of G.
    return [
        dict(DEFAULT_REFERENCE, params=dict(DEFAULT_REFERENCE["params"])),
        {"name": "jpeg", "params": {"quality": 75}},
        {"name": "gaussian_blur", "params": {"sigma": 0.8}},
        {"name": "resize", "params": {"scale": 0.7}},
    ]


@dataclass
class RecNetSettings:
    """Rec-Net (Algorithm 1): candidate layers B_i, pretrained layers Q_i, search settings.

    Attributes:
        layers: B_i, category names per layer.
        pretrained: Q_i, one ``{"name", "params"}`` per category of each layer (Algorithm 1,
            lines 1–6); empty until :func:`magdr.reconstruct.pretrain` fills it.
        patches: region patches reconstructed one after the other, each a list of
            ``magdr.faces.regions.REGIONS`` names.
        top_categories: how many categories of Q_i go on to the full-grid search (line 8).
        score_transforms: how many of the consistency transforms score a candidate during the
            search (fewer than K keeps the search affordable; the final check uses all K).
        max_rounds: detect → reconstruct rounds before giving up.
    """

    layers: list[list[str]] = field(default_factory=lambda: [list(x) for x in DEFAULT_LAYERS])
    pretrained: list[list[dict[str, Any]]] = field(default_factory=list)
    patches: list[list[str]] = field(
        default_factory=lambda: [
            ["skin", "brows", "eyes", "nose", "mouth", "ears"],
            ["hair"],
            ["neck", "background"],
        ]
    )
    top_categories: int = 3
    score_transforms: int = 2
    max_rounds: int = 2

    def q_layers(self) -> list[list[dict[str, Any]]]:
        """Q_i, or (uncalibrated) each category at the middle of its grid."""
        if self.pretrained:
            return self.pretrained
        out = []
        for cats in self.layers:
            layer = []
            for cat in cats:
                grid = get_transform(cat).grid
                layer.append({"name": cat, "params": dict(grid[len(grid) // 2])})
            out.append(layer)
        return out


@dataclass
class Profile:
    """Thresholds, λ, w and Rec-Net layers for one generator (see the module docstring)."""

    name: str = "uncalibrated"
    distances: list[str] = field(default_factory=lambda: ["l1", "l2", "linf", "dssim"])
    mu: list[float] = field(default_factory=lambda: [0.05, 0.008, 0.4, 0.1])
    sigma: list[float] = field(default_factory=lambda: [0.03, 0.008, 0.2, 0.05])
    w: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])
    reference: dict[str, Any] | None = None
    lam: float = 0.05
    threshold: float = 0.05
    consistency: list[dict[str, Any]] = field(default_factory=default_consistency)
    cons_distance: str = "l2"
    min_region_area: float = 0.005
    recnet: RecNetSettings = field(default_factory=RecNetSettings)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.recnet, dict):
            self.recnet = RecNetSettings(**self.recnet)
        m = len(self.distances)
        for key in ("mu", "sigma", "w"):
            if len(getattr(self, key)) != m:
                raise ValueError(f"profile.{key}: expected {m} values (one per distance)")
        for name in [*self.distances, self.cons_distance]:
            if name not in DISTANCES:
                raise ValueError(f"profile: unknown distance {name!r}; known: {list(DISTANCES)}")
        for t in [*self.consistency, *([self.reference] if self.reference else [])]:
            get_transform(t["name"])
        # Rec-Net's names too, so a bad profile fails when loaded, not at the first attack.
        for cat in [c for layer in self.recnet.layers for c in layer]:
            get_transform(cat)
        for m in [m for layer in self.recnet.pretrained for m in layer]:
            get_transform(m["name"])
        bad = [r for patch in self.recnet.patches for r in patch if r not in REGIONS]
        if bad:
            raise ValueError(f"profile.recnet.patches: unknown regions {bad}; known: {REGIONS}")
        if not self.consistency:
            raise ValueError("profile.consistency: the consistency detector needs K >= 1")

    def recnet_transforms(self) -> list[dict[str, Any]]:
        """Every Rec-Net candidate ``{"name", "params"}`` (all grids of all layers' categories)."""
        seen: dict[str, dict[str, Any]] = {}
        for cats in self.recnet.layers:
            for cat in cats:
                for p in get_transform(cat).grid:
                    key = json.dumps([cat, p], sort_keys=True)
                    seen.setdefault(key, {"name": cat, "params": p})
        return list(seen.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {"version": 1, **asdict(self)}

    def save(self, path: str | Path) -> None:
        """Write as JSON (via a temporary name, so a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """Parse, rejecting unknown keys and versions."""
        d = dict(d)
        version = d.pop("version", 1)
        if version != 1:
            raise ValueError(f"profile: unsupported version {version}; expected 1")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"profile: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Load a profile JSON file; errors name the file."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: not a valid MagDR profile: {e}") from e


def load_profile(profile: Profile | str | Path | None = "default") -> Profile:
    """``"default"``/``None``: the shipped profile (uncalibrated if none ships); else a path."""
    if isinstance(profile, Profile):
        return profile
    if profile is None or profile == "default":
        return Profile.load(DEFAULT_PROFILE) if DEFAULT_PROFILE.exists() else Profile()
    return Profile.load(profile)
