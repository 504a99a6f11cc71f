"""Cache the shipped parser's soft region maps of the first N CelebA train faces (MAGDR_CACHE).

What every generator training on a lent GPU needs before it starts; the device scripts
(``tools/gpu_session.sh``, ``tools/gpu_scratch.sh``) call it first::

    python3 tools/cache_regions.py cuda 8000
"""

from __future__ import annotations

import sys

import torch

from magdr.train import data as D
from magdr.train.stargan import WEIGHTS, cached_region_probs

if __name__ == "__main__":
    device, n = sys.argv[1], int(sys.argv[2])
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
    cached_region_probs(WEIGHTS / "parser.pt", D.load_celeba()["images"][:n], device)
