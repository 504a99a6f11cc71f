"""Central argument checks with messages that say what was expected and what came.

Like kornia's ``KORNIA_CHECK_SHAPE``: the message is only built when the check fails, so the
checks cost nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ShapeError(ValueError):
    """A tensor did not have the documented shape."""


def check_shape(x: object, dims: Sequence[str], name: str = "x") -> None:
    """Check that ``x`` is a tensor whose shape matches ``dims``.

    Args:
        x: the value to check.
        dims: one entry per dimension: a letter (any size) or a number as a string (that size).
        name: how the value is called in the error message.

    Raises:
        TypeError: ``x`` is not a tensor.
        ShapeError: the rank or a fixed size differs.

    Example:
        >>> check_shape(torch.zeros(2, 3, 8, 8), ["B", "3", "H", "W"])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(dims) and all(
        not d.isdigit() or int(d) == s for d, s in zip(dims, x.shape, strict=False)
    )
    if not ok:
        raise ShapeError(f"{name}: expected shape [{','.join(dims)}], got {list(x.shape)}")


def check_images(x: object, name: str = "x") -> None:
    """Check a batch of RGB images ``[B,3,H,W]``, floating point, range per the caller."""
    check_shape(x, ["B", "3", "H", "W"], name)
    assert isinstance(x, torch.Tensor)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor in [-1, 1], got {x.dtype}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str = "a, b") -> None:
    """Check that two tensors have the same shape."""
    if a.shape != b.shape:
        raise ShapeError(f"{names}: expected equal shapes, got {list(a.shape)} and {list(b.shape)}")
