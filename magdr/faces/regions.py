"""Face classes -> attribute regions, and each task's target region (DESIGN §5).

The face parser gives 19 soft classes in BiSeNet / CelebAMask-HQ order. MagDR works on a few
*attribute regions* M_i (paper §3.2.1): the 19 classes are summed into ``N = len(REGIONS)``
regions with one fixed table, so the regions of a pixel sum to 1 exactly as the classes do.
"""

from __future__ import annotations

import torch

from magdr.check import check_shape

#: BiSeNet / CelebAMask-HQ class order (index = channel of the parser output).
BISENET_CLASSES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
    "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip

#: The attribute regions, in channel order of :func:`group_regions`.
REGIONS: tuple[str, ...] = (
    "skin", "brows", "eyes", "nose", "mouth", "ears", "hair", "neck", "background",
)  # fmt: skip

#: Which region each BiSeNet class belongs to. Cloth and hat count as background: no edit task
#: targets them, so a change there is as suspicious as a change of the background.
CLASS_TO_REGION: dict[str, str] = {
    "background": "background", "skin": "skin", "l_brow": "brows", "r_brow": "brows",
    "l_eye": "eyes", "r_eye": "eyes", "eye_g": "eyes", "l_ear": "ears", "r_ear": "ears",
    "ear_r": "ears", "nose": "nose", "mouth": "mouth", "u_lip": "mouth", "l_lip": "mouth",
    "neck": "neck", "neck_l": "neck", "cloth": "background", "hair": "hair", "hat": "background",
}  # fmt: skip

#: Target regions of the tasks and attributes the generators know (DESIGN §5).
FACE_PARTS: tuple[str, ...] = ("skin", "brows", "eyes", "nose", "mouth")
TARGETS: dict[str, tuple[str, ...]] = {
    "hair": ("hair",),  # hair colour edits
    "face+hair": (*FACE_PARTS, "ears", "hair"),  # gender / age edits
    "reenact": ("mouth", "eyes", "brows"),  # facial reenactment (GANimation)
    "replace": FACE_PARTS,  # face replacement (CycleGAN)
}


def _grouping_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[N, 19]`` 0/1 matrix: row i sums the classes of region i."""
    m = torch.zeros(len(REGIONS), len(BISENET_CLASSES), dtype=dtype, device=device)
    for j, cls in enumerate(BISENET_CLASSES):
        m[REGIONS.index(CLASS_TO_REGION[cls]), j] = 1.0
    return m


def group_regions(class_probs: torch.Tensor) -> torch.Tensor:
    """Sum 19 soft class maps into the N attribute regions M_i (paper §3.2.1).

    Args:
        class_probs: parser output, :math:`(B, 19, H, W)`, per-pixel probabilities.

    Returns:
        regions :math:`(B, N, H, W)` with ``N = len(REGIONS)``; they sum to 1 where the classes do.

    Example:
        >>> p = torch.softmax(torch.randn(2, 19, 8, 8), 1)
        >>> r = group_regions(p)
        >>> r.shape, bool(torch.allclose(r.sum(1), torch.ones(2, 8, 8)))
        (torch.Size([2, 9, 8, 8]), True)
    """
    check_shape(class_probs, ["B", str(len(BISENET_CLASSES)), "H", "W"], "class_probs")
    m = _grouping_matrix(class_probs.dtype, class_probs.device)
    return torch.einsum("nc,bchw->bnhw", m, class_probs)


def region_indicator(names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``[N]`` float 0/1 vector marking the named regions (for ``Generator.target_regions``)."""
    unknown = [n for n in names if n not in REGIONS]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; known: {list(REGIONS)}")
    return torch.tensor([1.0 if r in names else 0.0 for r in REGIONS])


def target_mask(regions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft mask of the target attribute region M_c, :math:`(B, 1, H, W)`.

    Args:
        regions: :math:`(B, N, H, W)` from :func:`group_regions`.
        targets: :math:`(B, N)` 0/1 from ``Generator.target_regions(c)``.
    """
    check_shape(regions, ["B", str(len(REGIONS)), "H", "W"], "regions")
    check_shape(targets, ["B", str(len(REGIONS))], "targets")
    return (regions * targets[:, :, None, None].to(regions)).sum(1, keepdim=True)
