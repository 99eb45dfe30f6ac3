#!/usr/bin/env bash
# Everything a session with the GPU machine should run, in one call (device tool: run "bash benchmarks/gpu_session.sh").
# Writes results into benchmarks/results/ and, when $OUT is set (the device tool), packs them into $OUT/results.tgz.
# The GPU image has torch/triton/transformers but not diffusers: carry its wheel (device README, ".whl") and
# install it first. All of it takes longer than one 10-minute device call: run the sections in separate calls.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"
CSA_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_gpu.py 2>&1 | tail -15  # fixed configs: tuning each shape is slow
# the op suite below autotunes, and its correctness gate checks the tuned kernel at the headline sizes
python3 -m storydiff.cli bench --suite op --size headline
python3 -m storydiff.cli bench --suite unet
python3 -m storydiff.cli bench --suite motion
python3 -m storydiff.cli profile-vram --modes official_b,ours,ours_offload,window --lengths 4,8,16 --steps 10
python3 -m storydiff.cli profile-vram --modes window,window_unchunked --lengths 8,32,128,256 --steps 4 --size 768
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" benchmarks/results; fi  # one file: the device tool returns at most 8
