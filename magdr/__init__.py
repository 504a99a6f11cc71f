"""MagDR: mask-guided detection and reconstruction against disrupted deepfake inputs (CVPR 2021).

The public API (DESIGN §3)::

    import magdr
    G = magdr.load_generator("default")
    c = magdr.condition(G, {"Blond_Hair": 1}, batch=B)
    P = magdr.load_parser("default")
    guard = magdr.Guard(G)
    r = guard(x, c)             # GuardResult

Names are imported lazily so that ``import magdr`` stays cheap (no torchvision, no weights).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_generator": "magdr.models.registry",
    "Generator": "magdr.models.base",
    "condition": "magdr.models.base",
    "load_parser": "magdr.faces.parsing",
    "FaceParser": "magdr.faces.parsing",
    "Guard": "magdr.guard",
    "GuardResult": "magdr.guard",
    "Profile": "magdr.profile",
    "attacks": "magdr.attacks",
    "metrics": "magdr.metrics",
    "transforms": "magdr.transforms",
    "detect": "magdr.detect",
    "reconstruct": "magdr.reconstruct",
    "calibrate": "magdr.calibrate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'magdr' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if _LAZY[name].endswith(name) else getattr(module, name)
    globals()[name] = value
    return value
