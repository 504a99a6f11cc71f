"""Reading weights safely: ``torch.load(weights_only=True)``, strict keys, readable errors.

Shared by the generator registry and the face parsers. No pickle is ever executed: a file that
needs more than tensors to unpickle is refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

#: Where the shipped weights live: the default G, parser, purifier and profile.
WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "weights"

#: Keys under which training scripts commonly nest a state dict.
CONTAINER_KEYS = (
    "state_dict", "G", "netG", "generator", "G_state_dict", "model_state_dict", "model", "net",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not match the expected layout."""


def key_list(keys: list[str], n: int = 6) -> str:
    """``"N (k1, k2, ...)"``: a count and the first ``n`` keys, for error messages."""
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_state_dict(
    path: str | os.PathLike[str], what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file as a flat state dict, safely.

    Unwraps one level of container (``{"state_dict": sd}``, ``{"G": sd}``, ...) when exactly one
    known key holds a state dict, and a ``module.`` prefix (``nn.DataParallel``) when every key
    has it.

    Args:
        path: the file.
        what: what the file should be, for messages (``"generator checkpoint"``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file needs more than tensors to unpickle (refused), is not a
            checkpoint, or holds no unambiguous state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, it is not a plain weights file (torch.load weights_only=True "
            f"would have to run pickled code): {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
    if not _is_state_dict(obj):
        nested = obj if isinstance(obj, Mapping) else {}
        found = [k for k in CONTAINER_KEYS if _is_state_dict(nested.get(k))]
        if len(found) != 1:
            what_ = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(
                f"{path}: expected a state dict (name -> tensor), or a dict with exactly one of "
                f"{list(CONTAINER_KEYS)} holding one; found {found or what_}"
            )
        obj = obj[found[0]]
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_strict(
    module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, layout: str
) -> nn.Module:
    """Load ``sd`` into ``module`` with strict keys and shapes, or raise a readable error.

    Checkpoints saved before PyTorch 0.4.1 have no ``num_batches_tracked`` counters; they are
    unused here (normalisation statistics are fixed or per-image), so zeros fill them in.

    Raises:
        CheckpointError: naming ``source``, ``layout`` and the missing, unexpected and
            wrong-shape keys.
    """
    sd = dict(sd)
    expected = module.state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {list(sd[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [f"{source}: keys do not match the {layout} layout"]
        for name, keys, n in (
            ("missing", missing, 6),
            ("unexpected", unexpected, 6),
            ("wrong shape", wrong, 3),
        ):
            if keys:
                parts.append(f"{name} {key_list(keys, n)}")
        raise CheckpointError("; ".join(parts))
    module.load_state_dict(sd, strict=True)
    return module


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_digest(module: nn.Module) -> str:
    """A short hash of a module's weights: what caches and trained companions are keyed by."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
