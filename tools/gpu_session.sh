#!/usr/bin/env bash
# One lent-GPU session in one script (the device tool runs it from the repo root; results go to
# $OUT). Everything has a wall-time budget, so the script ends on time on an unknown machine:
#
#   1. caches: CelebA at 128 and the parser's soft region maps of the 8000 train faces;
#   2. in parallel on the one GPU: three generator recipes (magdr/train/stargan.py), one parser
#      run (magdr/train/parser.py), the CUDA tests + GPU timings, and a trial of the full bench;
#   3. every saved generator checkpoint scored on 300 validation faces (magdr/train/evaluate.py),
#      the best of each recipe kept, the parser scored on Face Synthetics val;
#   4. weights, evaluations and logs packed into a few files under $OUT.
#
# Inputs: the data folder in $MAGDR_DATA (CelebA + Face Synthetics, see ../shared/data/README),
# the evaluation/auxiliary classifiers in $CLASSIFIERS (eval.pt, aux.pt from
# magdr/train/classifier.py), BUDGET seconds in all (default 560). DEVICE, N_TRAIN and N_EVAL
# exist to rehearse the script on a CPU with a small budget.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-560}
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-8000}
N_EVAL=${N_EVAL:-300}
OUT=${OUT:-/tmp/gpu_out}
CLASSIFIERS=${CLASSIFIERS:-runs/classifier}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAGDR_CACHE=${MAGDR_CACHE:-/tmp/magdr_cache}
R=runs/gpu
mkdir -p "$OUT" "$R" "$MAGDR_CACHE"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stamp() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$R/timeline.txt"; }

stamp "start; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
python3 - "$DEVICE" "$N_TRAIN" <<'EOF' 2>&1 | tee "$R/setup.log"
import sys
import torch
from magdr.train import data as D
from magdr.train.stargan import WEIGHTS, cached_region_probs
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
cel = D.load_celeba()
cached_region_probs(WEIGHTS / "parser.pt", cel["images"][: int(sys.argv[2])], sys.argv[1])
EOF
stamp "caches ready"

# ---- 2. parallel jobs ---------------------------------------------------------------------
EVAL_S=110   # checkpoint sweep + packing at the end
TRAIN_MIN=$(python3 -c "print(round(($(left) - $EVAL_S) / 60, 2))")
stamp "training for $TRAIN_MIN min"
common=(--n-train "$N_TRAIN" --batch 32 --d-dim 32 --stage1-steps 0 --steps 1000000 --threads 1
        --device "$DEVICE" --aux "$CLASSIFIERS/aux.pt" --ckpt-every 1000 --log-every 100)
init=magdr/models/weights/default_G.pt
python3 -m magdr.train.stargan "${common[@]}" --init $init --max-minutes "$TRAIN_MIN" \
    --run-dir $R/v1 --out $R/v1/G.pt >$R/v1.log 2>&1 &
python3 -m magdr.train.stargan "${common[@]}" --init $init --max-minutes "$TRAIN_MIN" \
    --lambda-cls 2 --lambda-aux 3 --w-inside 0.05 --lr2 3e-4 \
    --run-dir $R/v2 --out $R/v2/G.pt >$R/v2.log 2>&1 &
AE_MIN=1.2
(python3 -m magdr.train.stargan "${common[@]}" --ae-only --conv-dim 24 --repeat-num 4 \
     --max-minutes $AE_MIN --ckpt-every 100000 --run-dir $R/v3ae --out $R/v3ae/G.pt &&
 python3 -m magdr.train.stargan "${common[@]}" --conv-dim 24 --repeat-num 4 --cond-gain 5 \
     --init $R/v3ae/G.pt --max-minutes "$(python3 -c "print($TRAIN_MIN - $AE_MIN - 0.3)")" \
     --run-dir $R/v3 --out $R/v3/G.pt) >$R/v3.log 2>&1 &
python3 -m magdr.train.parser --init magdr/models/weights/parser.pt --steps 1000000 \
    --max-minutes "$TRAIN_MIN" --fs-batch 16 --celeba-batch 4 --celeba-weight 0.2 --lr 1e-3 \
    --threads 2 --device "$DEVICE" --ckpt-every 500 --run-dir $R/parser --out $R/parser/parser.pt \
    >$R/parser.log 2>&1 &
(timeout 120 python3 -m pytest -q -m gpu tests/magdr -p no:cacheprovider 2>&1 | tail -15
 timeout $(($(left) - EVAL_S - 10)) python3 -m bench.time_guard --device "$DEVICE" --faces 32 \
     --repeats 3) >$R/gpu_tests.log 2>&1 &
timeout $(($(left) - 40)) python3 -m bench --device "$DEVICE" --eps 0.1 --step 0.02 --out $R/bench \
    --note "trial on a lent GPU shared with four training jobs" >$R/bench.log 2>&1 &
BENCH=$!
wait $(jobs -p | grep -v "^$BENCH$") 2>/dev/null
stamp "training done"

# ---- 3. evaluation ---------------------------------------------------------------------------
for v in v1 v2 v3; do
  (for g in $(ls $R/$v/G_*.pt 2>/dev/null | tail -6); do
     [ -e "$g" ] || continue
     python3 -m magdr.train.evaluate --G "$g" --only G --n "$N_EVAL" --device "$DEVICE" \
        --classifier "$CLASSIFIERS/eval.pt" --out "${g%.pt}.eval.json" >/dev/null 2>&1
   done) &
done
python3 -m magdr.train.evaluate --parser $R/parser/parser.pt --only parser \
    --out $R/parser/eval.json >$R/parser_eval.log 2>&1 &
wait $(jobs -p | grep -v "^$BENCH$") 2>/dev/null
stamp "evaluation done"
python3 - "$R" <<'EOF' 2>&1 | tee "$R/summary.txt"
import json, shutil, sys
from pathlib import Path
R = Path(sys.argv[1])
keep = R / "keep"
keep.mkdir(exist_ok=True)
for v in ("v1", "v2", "v3"):
    rows = []
    for f in sorted((R / v).glob("G_*.eval.json")):
        res = json.loads(f.read_text())
        bars = res["bars"]
        rec = [g["recognised_all"] for t, g in res["G"].items() if "recognised_all" in g]
        rows.append((sum(bars.values()), sum(rec) / len(rec), f))
        print(v, f.name, f"bars {sum(bars.values())}/{len(bars)}", f"mean recognised {rows[-1][1]:.3f}",
              " ".join(f"{t}:{g.get('recognised_all', 0):.2f}/{g['hair_ratio']:.2f}/{g['psnr_non_target_mean']:.1f}"
                       for t, g in res["G"].items()))
    if rows:
        best = max(rows, key=lambda r: (r[0], r[1]))[2]
        last = sorted((R / v).glob("G_*.eval.json"))[-1]
        for f in {best, last}:
            g = f.with_name(f.name.replace(".eval.json", ".pt"))
            for src in (g, g.with_suffix(".json")):
                shutil.copy(src, keep / f"{v}_{src.name}")
        print(v, "best", best.name)
p = R / "parser/eval.json"
if p.exists():
    print("parser", json.loads(p.read_text())["parser"]["facesynthetics_val_iou"])
EOF
kill $BENCH 2>/dev/null; sleep 2
tar czf "$OUT/models.tgz" -C $R keep
cp $R/parser/parser.pt "$OUT/parser_gpu.pt" 2>/dev/null
tar czf "$OUT/logs.tgz" --exclude='*.pt' --exclude='ckpt*' -C runs gpu
cp $R/summary.txt $R/timeline.txt "$OUT/" 2>/dev/null
stamp "packed"
