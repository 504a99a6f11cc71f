#!/usr/bin/env bash
# The GPU check in one short script (minutes): the CUDA tests, then per-face timings of plain G,
# the guard on clean faces and the reconstruct path, on the GPU. Results go to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
python3 -m pip install -q -e '.[test]'
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt"
python3 -m bench.time_guard --device cuda --faces 32 --repeats 3 | tee "$out/gpu_timing.json"
