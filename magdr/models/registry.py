"""``load_generator``: a checkpoint path or ``"default"`` -> a ready :class:`Generator` (DESIGN §3).

Checkpoints are read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary
pickled objects (code) is refused, never executed. Keys are checked strictly against the layout
of the recognised (or requested) kind, and a mismatch raises :class:`CheckpointError` naming the
file, the kind and the missing / unexpected keys.

A JSON file beside the checkpoint (same name, ``.json`` suffix) is optional metadata::

    {"kind": "stargan", "image_size": 64, "attributes": [...], "neutral": [...],
     "attribute_targets": {"Male": "face+hair"}, ...}

Known keys configure the generator; every key is kept in ``G.meta``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from magdr.checkpoints import (
    WEIGHTS_DIR,
    CheckpointError,
    key_list,
    load_strict,
    read_state_dict,
    resolve_device,
)
from magdr.faces.regions import TARGETS
from magdr.models.base import Generator
from magdr.models.cyclegan import CycleGAN
from magdr.models.ganimation import GANimation, drop_debug_aliases
from magdr.models.stargan import StarGAN

DEFAULT_NAME = "default_G.pt"
KINDS: dict[str, type[Generator]] = {
    "stargan": StarGAN,
    "ganimation": GANimation,
    "cyclegan": CycleGAN,
}
#: Metadata keys that set generator attributes (``kind`` picks the class).
META_ATTRS = ("image_size", "attributes", "neutral", "attribute_targets")


def sniff_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Recognise the generator family from a state dict's keys, or ``None``.

    GANimation: its attention/colour heads; CycleGAN: ``model.*`` with ``conv_block`` residual
    blocks; StarGAN: ``main.0.weight`` with ``main.N.main.*`` residual blocks and no heads.
    """
    keys = set(sd)
    if any(k.startswith(("img_reg.", "attetion_reg.", "im_reg.", "im_att.")) for k in keys):
        return "ganimation"
    if "model.1.weight" in keys and any(".conv_block." in k for k in keys):
        return "cyclegan"
    if "main.0.weight" in keys and any(k.startswith("main.") and ".main." in k for k in keys):
        return "stargan"
    return None


def _build(kind: str, sd: dict[str, torch.Tensor], path: Path) -> Generator:
    """Instantiate ``kind`` for ``sd``'s shapes and load it strictly, with a readable error."""
    cls = KINDS[kind]
    try:
        if kind == "ganimation":
            sd = drop_debug_aliases(sd)
        config = cls.config_from_state_dict(sd)  # type: ignore[attr-defined]
        G = cls(**config)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(
            f"{path}: does not look like a {kind} checkpoint ({e}); "
            f"found keys {key_list(sorted(sd))}"
        ) from e
    load_strict(G, sd, str(path), f"{kind} {config}")
    return G


def _apply_meta(G: Generator, meta: dict[str, Any], path: Path) -> None:
    for key in META_ATTRS:
        if key in meta:
            setattr(G, key, meta[key])
    for key in ("attributes", "neutral"):
        if len(getattr(G, key)) != G.c_dim:
            raise CheckpointError(
                f"{path}: metadata {key} has {len(getattr(G, key))} entries, the weights take "
                f"c_dim={G.c_dim}"
            )
    bad = {a: t for a, t in G.attribute_targets.items() if t not in TARGETS}
    if bad:
        raise CheckpointError(f"{path}: attribute_targets {bad}: expected keys of {list(TARGETS)}")
    if "attributes" in meta and "attribute_targets" not in meta and G.task == "edit":
        G.attribute_targets = {
            a: ("hair" if a.endswith("_Hair") else "face+hair") for a in G.attributes
        }
    G.attributes, G.neutral = list(G.attributes), [float(v) for v in G.neutral]


def load_generator(
    path_or_name: str | os.PathLike[str],
    kind: str | None = None,
    device: str | torch.device = "cpu",
) -> Generator:
    """Load a guarded generator from a checkpoint or the shipped default (DESIGN §3).

    Args:
        path_or_name: ``"default"`` (``magdr/models/weights/default_G.pt``) or a checkpoint
            path: yunjey/stargan ``{iter}-G.ckpt``, GANimation ``net_epoch_N_id_G.pth`` or
            ``{iter}-G.ckpt`` (Ruiz et al.'s fork), CycleGAN ``latest_net_G_A.pth``.
        kind: ``"stargan"`` | ``"ganimation"`` | ``"cyclegan"``; recognised from the keys (or
            the metadata JSON's ``kind``) when ``None``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        The generator in ``eval()`` mode on ``device``; its parameters keep ``requires_grad``
        (attacks differentiate through G). ``G.meta`` holds the metadata and the source path.

    Raises:
        FileNotFoundError: no such checkpoint (or the default weights are not built yet).
        CheckpointError: refused or unreadable file, unknown kind, keys that do not match.

    Example:
        >>> G = load_generator("default")  # doctest: +SKIP
        >>> G.image_size, G.c_dim, G.attributes  # doctest: +SKIP
        (64, 5, ['Black_Hair', 'Blond_Hair', 'Brown_Hair', 'Male', 'Young'])
    """
    if str(path_or_name) == "default":
        path = WEIGHTS_DIR / DEFAULT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"the default generator weights {path} are not there yet: they are produced by "
                "training/ and shipped with the package; train them or pass a checkpoint path"
            )
    else:
        path = Path(path_or_name)
    meta_path = path.with_suffix(".json")
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_path}: invalid metadata JSON: {e}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_path}: metadata must be a JSON object")
    sd = read_state_dict(path, "generator checkpoint")
    sniffed = sniff_kind(sd)
    kind = kind or meta.get("kind") or sniffed
    if kind is None:
        raise CheckpointError(
            f"{path}: cannot tell the generator kind from its keys {key_list(sorted(sd))}; "
            f"pass kind= one of {list(KINDS)}"
        )
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown kind {kind!r}; expected one of {list(KINDS)}")
    G = _build(kind, sd, path)
    _apply_meta(G, meta, meta_path)
    G.meta = {**meta, "kind": kind, "path": str(path)}
    return G.to(resolve_device(device)).eval()
