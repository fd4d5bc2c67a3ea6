#!/bin/bash
# TensorRT engines for Bedside models, keyed by TensorRT version and GPU model.
#   engines.sh build   (engine-build Job) build a plan for the newest version of every model
#                      that has build_tensorrt_engines.sh, unless the cache already has it
#   engines.sh stage   (Triton init container) copy the repository to /served and swap in the
#                      cached plan and config.tensorrt_plan.pbtxt where one matches this node
# Mounts: /models (repository, read-only), /engine-cache (PVC), /served (emptyDir, stage only).
set -euo pipefail

trt_version() {
  if [ -n "${TRT_VERSION:-}" ]; then echo "$TRT_VERSION"; return; fi
  trtexec 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n1 | cut -dv -f2
}
gpu_model() {
  nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr -c 'A-Za-z0-9.\n-' '_'
}
newest_version() {  # $1: model folder
  find "$1" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' | sort -n | tail -n1
}

KEY="trt-$(trt_version)/$(gpu_model)"
echo "engine cache key: $KEY"

case "${1:-}" in
  build)
    for script in /models/*/build_tensorrt_engines.sh; do
      [ -e "$script" ] || { echo "no model asks for TensorRT engines"; exit 0; }
      model_dir=$(dirname "$script"); model=$(basename "$model_dir")
      version=$(newest_version "$model_dir")
      target="/engine-cache/$KEY/$model/$version"
      if [ -s "$target/model.plan" ]; then echo "$model v$version: cached"; continue; fi
      work="$target.partial"; rm -rf "$work"; mkdir -p "$work"
      ln -s "$model_dir/$version/model.onnx" "$work/model.onnx"
      echo "$model v$version: building"
      sh "$script" "$work"
      rm "$work/model.onnx"; rm -rf "$target"; mv "$work" "$target"
      echo "$model v$version: built $target/model.plan"
    done ;;
  stage)
    cp -R /models/. /served/
    for model_dir in /served/*/; do
      model=$(basename "$model_dir"); version=$(newest_version "$model_dir")
      plan="/engine-cache/$KEY/$model/$version/model.plan"
      if [ -s "$plan" ] && [ -f "$model_dir/config.tensorrt_plan.pbtxt" ]; then
        cp "$plan" "$model_dir/$version/model.plan"
        cp "$model_dir/config.tensorrt_plan.pbtxt" "$model_dir/config.pbtxt"
        echo "$model v$version: serving the TensorRT plan"
      else
        echo "$model v$version: no plan for $KEY, serving the ONNX config"
      fi
    done ;;
  *) echo "usage: engines.sh build|stage" >&2; exit 2 ;;
esac
