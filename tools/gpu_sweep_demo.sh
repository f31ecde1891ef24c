#!/usr/bin/env bash
# One device call: install the carried wheels, train the recipes below side by side on the
# GPU (tools/sweep_demo_model.py), and return the results plus the two best model folders
# (tar, split under the 16 MiB per-file limit). Usage on the device: bash tools/gpu_sweep_demo.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The open question (docs/demo-model-experiments.md, session 6): does a wider first UNet level
# draw square corners? The shipped recipe from scratch at two widths; two recipes share the
# GPU at about 6 steps/s each, so 2500 steps of batch 96 fit the budget.
common="--seed 0 --dataset 6000 --vae-from assets/demo-model/vae --unet-steps 2500 --batch 96"
v="--prediction-type v_prediction --zero-terminal-snr --downsample-padding 0 --high-noise-frac 0.15"
cat > /tmp/recipes.json <<JSON
{
  "w32": "$common $v --unet-first-channels 32",
  "w64": "$common $v --unet-first-channels 64"
}
JSON
python3 tools/sweep_demo_model.py --recipes /tmp/recipes.json --out /tmp/sweep --budget-s "${BUDGET_S:-460}" --threads 2 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/sweep.log"
cp /tmp/sweep/results.json "$OUT/" 2>/dev/null
tail -c 600 /tmp/sweep/*.log | tr "\r" "\n" | tail -5
# the two best finished recipes by min(shape, position), as split tars
python3 - <<'PY' > /tmp/best.txt
import json
r = json.load(open("/tmp/sweep/results.json"))
ok = sorted((v["worst"], k) for k, v in r.items() if "worst" in v)
print(" ".join(k for _, k in ok[-2:]))
PY
for name in $(cat /tmp/best.txt); do
  tar -C /tmp/sweep -cf "/tmp/$name.tar" --exclude=vae-stage1 "$name"
  split -b 15M -d "/tmp/$name.tar" "$OUT/$name.tar.part"
done
ls -la "$OUT"
