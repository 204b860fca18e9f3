#!/usr/bin/env bash
# The end-to-end demo on the built-in demo photographs (no download, CPU only, 2 cores; about
# 2.5 minutes on a CPU with bf16 units, about 8 without them, see README.md):
#   bash launch/demo.sh
# 1. build the demo shards, 2. train briefly with 2 DDP processes on the CPU (gloo),
# 3. score the generator against the blurred input and classical deconvolution on the held-out
# test crops, 4. say where the sample grid, the metrics and the W&B offline run are.
# Running it again reuses the shards and the finished run (training resumes at its last
# checkpoint, so it stops at once); delete runs/demo to train afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=shards/demo
RUN=runs/demo  # output_dir in configs/demo.yaml

python -m deblur.shard --demo --out "$SHARDS"

# `--multi_gpu --num_processes 2` starts 2 processes under DDP; without a GPU they run on the
# CPU (gloo). configs/accelerate.yaml only keeps accelerate launch from warning about defaults
# while leaving the precision to train.mixed_precision (auto).
accelerate launch --config_file configs/accelerate.yaml --multi_gpu --num_processes 2 \
    launch/train.py --config configs/demo.yaml

python -m deblur.evaluate --weights "$RUN/generator.safetensors" --shards "$SHARDS" --split test \
    | tee "$RUN/evaluate.txt"

# The demo's promise: the generator beats the blurred input on the held-out test crops.
# The comparison is printed last and the verdict sets the exit status.
verdict=0
python - "$RUN/evaluate.txt" > "$RUN/verdict.txt" <<'PY' || verdict=$?
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
rows = [("generator (restored)", "restored", "  <- this model"),
        ("blurred input", "blurred", "  <- the bar to beat"),
        ("Wiener, true kernel", "wiener", ""),
        ("Richardson-Lucy, true kernel", "richardson_lucy", "")]
print(f"On {r['n']} held-out test crops (64x64, cut from photographs never seen in training):")
for label, key, note in rows:
    print(f"  {label:<30} PSNR {r[key]['psnr']:6.2f} dB   SSIM {r[key]['ssim']:.3f}{note}")
print("  (Wiener and Richardson-Lucy are given each sample's true blur kernel; the generator is not.)")
beats = all(r["restored"][m] > r["blurred"][m] for m in ("psnr", "ssim"))
print(f"Verdict: the generator {'beats' if beats else 'does NOT beat'} the blurred input in both PSNR and SSIM.")
sys.exit(0 if beats else 1)
PY

grid=$(ls -1 "$RUN"/samples/*.png 2>/dev/null | tail -n 1 || true)
# One folder per attempt (a resumed run adds one, with the same run id); `wandb sync` uploads
# them in order into one W&B run.
wandb_runs=$(ls -1d "$RUN"/wandb/offline-run-* 2>/dev/null | tr '\n' ' ' || true)
cat <<MSG

Demo finished.
  generator weights : $RUN/generator.safetensors   (the EMA of training; the raw G: generator_raw.safetensors)
  discriminator     : $RUN/discriminator.safetensors   (fine-tune both with train.init_from=$RUN)
  sample grid       : ${grid:-none written (see $RUN/samples)}
  training metrics  : $RUN/metrics.json   (test split, from the trainer)
  evaluation        : $RUN/evaluate.txt   (restored vs blurred vs Wiener vs Richardson-Lucy)
  W&B offline run   : ${wandb_runs:-none (wandb disabled?)}
                      upload later with: wandb sync ${wandb_runs:-<run dirs>}
Deblur your own images:
  python -m deblur.infer --weights $RUN/generator.safetensors --out restored/ image.jpg

MSG
cat "$RUN/verdict.txt"
exit "$verdict"
