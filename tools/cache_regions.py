"""Cache the shipped parser's soft region maps of the 9000 CelebA faces (MAGDR_CACHE).

What every generator training and evaluation needs before it starts (each slices the faces it
uses out of this one cache); the device scripts (``tools/gpu_session.sh``,
``tools/gpu_scratch.sh``) call it first::

    python3 tools/cache_regions.py cuda
"""

from __future__ import annotations

import sys

import torch

from training import data as D
from training.shared import WEIGHTS, cached_region_probs

if __name__ == "__main__":
    device = sys.argv[1]
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
    cached_region_probs(WEIGHTS / "parser.pt", D.load_celeba()["images"], device)
