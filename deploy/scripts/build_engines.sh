#!/usr/bin/env bash
# Builds one release of the GPU model repository on THIS GPU and publishes it atomically.
# Usage: build_engines.sh MODELS_ROOT RELEASE   (the engine-build Job runs it in the
# engine-builder image on the serving GPU type; see deploy/README.md, "Build engines").
#   MODELS_ROOT/staging/RELEASE.<pid>  is written first, then renamed to
#   MODELS_ROOT/releases/RELEASE       which the serving pods read (never overwritten).
# Weights and ONNX files come from MARROWDX_WORK_DIR (trained there once if missing; both
# marrowdx commands are idempotent). MARROWDX_PRESET and MARROWDX_PRECISION (fp16|fp32)
# choose the training preset and the engine precision.
set -euo pipefail

root=${1:?usage: build_engines.sh MODELS_ROOT RELEASE}
release=${2:?usage: build_engines.sh MODELS_ROOT RELEASE}
preset=${MARROWDX_PRESET:-reference}
precision=${MARROWDX_PRECISION:-fp16}
out="$root/releases/$release"
stage="$root/staging/$release.$$"
engines="$stage.engines"
here=$(dirname "$(readlink -f "$0")")

if [[ -e "$out" ]]; then
    echo "release $release is already published at $out; choose a new MODEL_RELEASE" >&2
    exit 1
fi
mkdir -p "$root/releases" "$root/staging"
trap 'rm -rf "$stage" "$engines"' EXIT

# 1. TensorRT engines on this GPU with this TensorRT, from the exported ONNX files; each
#    <model>.<precision>.plan gets a sidecar .plan.json naming the GPU and TensorRT version;
#    each optimisation profile covers max_batch_size of the configs/gpu.pbtxt serving it
#    (read from the installed package: no batch-size flag is needed here)
precision_flag=()
[[ "$precision" == fp16 ]] && precision_flag=(--fp16)
marrowdx export --tensorrt "${precision_flag[@]}" --preset "$preset" --out "$engines"
# 2. the gpu target repository: DALI preprocess, tensorrt_plan models, ensemble, KIND_GPU
marrowdx build --target gpu --preset "$preset" --out "$stage"
# 3. each engine (and its sidecar) where Triton's tensorrt_plan platform loads it; the models
#    with engines are those the tensor contract (marrowdx.contract) exports
models=$(python3 -m marrowdx.serving.contract_cli models --exported)
for model in $models; do
    cp "$engines/$model.$precision.plan" "$stage/$model/1/model.plan"
    cp "$engines/$model.$precision.plan.json" "$stage/$model/1/model.plan.json"
done
# 4. the release manifest the serving pods' init container checks; check it here too
python3 "$here/engine_manifest.py" record "$stage"
python3 "$here/engine_manifest.py" verify "$stage"
# 5. publish: a rename on one filesystem, so pods never see a half-written release
mv "$stage" "$out"
rm -rf "$engines"
trap - EXIT
echo "published $out"
