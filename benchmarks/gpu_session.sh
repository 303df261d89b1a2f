#!/usr/bin/env bash
# Issue 24's GPU measurements as one call on a lent device machine (about 9 minutes on one H100; nothing runs twice):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=560)   # the device tool; results come back under $OUT
#
# 1. ViT-B-32 at 224 px, batch 64, k = 1024: the engine (features + norms) against a training step, fp32 and bf16,
#    side by side in one process each (bench_gradients' paired worker) -> gradients_gpu.json / gradients_gpu_bf16.json;
# 2. Diff-In's cost per sample per checkpoint in its default (propagated) form, the default job and the taylor form,
#    against a training step (bench_diffin_cost) -> diffin_cost_gpu.json;
# 3. the demo through `pruner prune` with ray.accelerator gpu (one GPU actor), then `pruner rescore --target` on the
#    CUDA path (fp16 features, _dot_cuda) -> prune_gpu.log, rescore_gpu.log.
# Every step has its own time limit, so a slow one cannot take the others' time; results land in $OUT (or ./gpu-out).
set -u
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/device.txt" 2>&1
if ! $PY -c "import pruner" 2>/dev/null; then
  timeout 150 $PY -m pip install -q -e . >"$OUT/install.log" 2>&1 || echo "install failed (see install.log)" >&2
fi
for prec in fp32 bf16; do
  suffix=$([ "$prec" = bf16 ] && echo _bf16 || echo "")
  timeout 120 $PY benchmarks/bench_gradients.py --arch ViT-B-32 --batch-size 64 --k 1024 --device cuda \
      --precision "$prec" --repeats 5 --warmup 2 --variants train_step,engine \
      --out "$OUT/gradients_gpu$suffix.json" > "$OUT/gradients_$prec.log" 2>&1 || echo "gradients $prec: exit $?" >&2
done
timeout 150 $PY benchmarks/bench_diffin_cost.py --arch ViT-B-32 --batch-size 64 --device cuda --repeats 5 \
    --out "$OUT/diffin_cost_gpu.json" > "$OUT/diffin_cost.log" 2>&1 || echo "diffin cost: exit $?" >&2
timeout 120 $PY -m pruner.cli demo --output "$OUT/demo" --set ray.accelerator=gpu --set ray.num_actors=1 \
    > "$OUT/prune_gpu.log" 2>&1 || echo "demo on gpu: exit $?" >&2
job=$(ls -d "$OUT"/demo/jobs/demo-* 2>/dev/null | head -1)
[ -n "$job" ] && timeout 60 $PY -m pruner.cli rescore "$job" --target pruner/demo/target --device cuda \
    > "$OUT/rescore_gpu.log" 2>&1 || echo "rescore on gpu: exit $?" >&2
rm -rf "$OUT/demo/proxy/train/checkpoints"  # the proxy's weights are not needed back
ls -la "$OUT"
