#!/usr/bin/env bash
# One lent-GPU session in one script (the device tool runs it from the repo root; results go to
# $OUT). Everything has a wall-time budget, so the script ends on time on an unknown machine:
#
#   1. caches: CelebA at 128 and the parser's soft region maps of the 9000 CelebA faces;
#   2. in parallel on the one GPU: three generator recipes (training/stargan.py) and the CUDA
#      tests + GPU timings;
#   3. every saved generator checkpoint scored on 300 validation faces (training/evaluate.py),
#      the best and the last of each recipe kept;
#   4. weights, evaluations and logs packed into a few files under $OUT.
#
# Inputs: the data folder in $MAGDR_DATA (CelebA + Face Synthetics, see ../shared/data/README),
# the classifiers in $CLASSIFIERS (default .gpu/models; training/classifier.py: eval.pt, hair.pt for evaluation;
# aux.pt, aux_hair.pt teaching G), BUDGET seconds in all (default 560). DEVICE, N_TRAIN and N_EVAL
# exist to rehearse the script on a CPU with a small budget:
#
#   run(command="MAGDR_DATA=.gpu/data bash tools/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#   BUDGET=240 DEVICE=cpu N_TRAIN=64 N_EVAL=20 T3_STAGE1=20 CLASSIFIERS=runs/classifier bash tools/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-560}
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-8000}
N_EVAL=${N_EVAL:-300}
OUT=${OUT:-/tmp/gpu_out}
CLASSIFIERS=${CLASSIFIERS:-.gpu/models}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAGDR_CACHE=${MAGDR_CACHE:-/tmp/magdr_cache}
R=runs/gpu
mkdir -p "$OUT" "$R" "$MAGDR_CACHE"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stamp() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$R/timeline.txt"; }

stamp "start; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
python3 tools/cache_regions.py "$DEVICE" 2>&1 | tee "$R/setup.log"
stamp "caches ready"

# ---- 2. parallel jobs ---------------------------------------------------------------------
# Three stage-2 recipes from the shipped generator (what is still open in issue 3: hair ratio
# >= 2 and recognition >= 80%) and the CUDA tests + GPU timings. The full bench has its own
# script (tools/gpu_bench.sh).
EVAL_S=110   # checkpoint sweep + packing at the end
TRAIN_MIN=$(python3 -c "print(round(($(left) - $EVAL_S) / 60, 2))")
stamp "training for $TRAIN_MIN min"
common=(--n-train "$N_TRAIN" --batch 32 --d-dim 32 --stage1-steps 0 --steps 1000000 --threads 1
        --device "$DEVICE" --aux "$CLASSIFIERS/aux.pt" --ckpt-every 1000 --log-every 100
        --init magdr/models/weights/default_G.pt --max-minutes "$TRAIN_MIN" --lambda-cls 2
        --lr2 3e-4)
RECIPES=(t1 t2 t3)
# docs/training-log.md, part 5: a hair-only teacher (--aux-hair) makes the hair edits real hair
# colour, a tint penalty (--lambda-tint) keeps the rest of the image's colour; run h3 on the CPU
# (batch 8, 30 min) reached ratios 1.29/1.39/1.16 with every PSNR bar. t1 is h3 at batch 32;
# t2 holds the rest of the image harder. t3 (part 6) distils the shipped G's edits with the hair
# itself recoloured on top (--teacher-edits all: that target passes every hair-ratio and PSNR
# bar, 10 of 13) for the whole budget: on the CPU, 4000 steps at batch 8 reached ratios
# 1.36/1.53/1.20, still rising, and F's stage 2 afterwards undid them in 1000 steps (run C2),
# so t3 stays in stage 1 (T3_STAGE1 sets where stage 2 would start).
hair=(--aux-hair "$CLASSIFIERS/aux_hair.pt" --w-inside 0)
python3 -m training.stargan "${common[@]}" "${hair[@]}" --lambda-aux 8 --lambda-rec 20 \
    --lambda-tint 50 --run-dir $R/t1 --out $R/t1/G.pt >$R/t1.log 2>&1 &
python3 -m training.stargan "${common[@]}" "${hair[@]}" --lambda-aux 8 --lambda-rec 30 \
    --lambda-tint 100 --run-dir $R/t2 --out $R/t2/G.pt >$R/t2.log 2>&1 &
python3 -m training.stargan "${common[@]}" --teacher magdr/models/weights/default_G.pt \
    --teacher-edits all --stage1-steps "${T3_STAGE1:-1000000}" --hair-weight 5 --lr 5e-4 --lambda-aux 8 \
    --lambda-rec 20 --w-inside 0 --lambda-tint 50 --run-dir $R/t3 --out $R/t3/G.pt >$R/t3.log 2>&1 &
(timeout 120 python3 -m pytest -q -m gpu tests/magdr -p no:cacheprovider 2>&1 | tail -15
 timeout 90 python3 -m bench.time_guard --device "$DEVICE" --faces 32 --repeats 3) \
    >$R/gpu_tests.log 2>&1 &
wait
stamp "training done"

# ---- 3. evaluation ---------------------------------------------------------------------------
for v in "${RECIPES[@]}"; do
  (for g in $(ls $R/$v/G_*.pt 2>/dev/null | tail -6); do
     [ -e "$g" ] || continue
     python3 -m training.evaluate --G "$g" --only G --n "$N_EVAL" --device "$DEVICE" \
        --classifier "$CLASSIFIERS/eval.pt" --hair-classifier "$CLASSIFIERS/hair.pt" \
        --out "${g%.pt}.eval.json" >/dev/null 2>&1
   done) &
done
wait
stamp "evaluation done"
python3 - "$R" "${RECIPES[@]}" <<'EOF' 2>&1 | tee "$R/summary.txt"
import json, shutil, sys
from pathlib import Path
R = Path(sys.argv[1])
keep = R / "keep"
keep.mkdir(exist_ok=True)
for v in sys.argv[2:]:
    rows = []
    for f in sorted((R / v).glob("G_*.eval.json")):
        res = json.loads(f.read_text())
        bars = res["bars"]
        rec = [g["recognised_all"] for t, g in res["G"].items() if "recognised_all" in g]
        rows.append((sum(bars.values()), sum(rec) / len(rec), f))
        print(v, f.name, f"bars {sum(bars.values())}/{len(bars)}", f"mean recognised {rows[-1][1]:.3f}",
              " ".join(f"{t}:{g.get('recognised_all', 0):.2f}/{g.get('hair_only_recognised_all', 0):.2f}"
                       f"/{g['hair_ratio']:.2f}/{g['psnr_non_target_mean']:.1f}" for t, g in res["G"].items()))
    if rows:
        best = max(rows, key=lambda r: (r[0], r[1]))[2]
        last = sorted((R / v).glob("G_*.eval.json"))[-1]
        for f in {best, last}:
            g = f.with_name(f.name.replace(".eval.json", ".pt"))
            for src in (g, g.with_suffix(".json")):
                shutil.copy(src, keep / f"{v}_{src.name}")
        print(v, "best", best.name)
EOF
tar czf "$OUT/models.tgz" -C $R keep
tar czf "$OUT/logs.tgz" --exclude='*.pt' --exclude='ckpt*' -C runs gpu
cp $R/summary.txt $R/timeline.txt "$OUT/" 2>/dev/null
stamp "packed"
