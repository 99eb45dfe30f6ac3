#!/usr/bin/env bash
# Everything a session with the GPU machine should run (device tool: run "bash benchmarks/gpu_session.sh [SECTION...]").
# Writes results into benchmarks/results/ and, when $OUT is set (the device tool), packs them into $OUT/results.tgz
# after every section (a call stopped at its limit still returns the finished sections) with the log in
# $OUT/session.log. The GPU image has torch/triton/transformers but not diffusers: carry its wheel (device README,
# ".whl") and install it first.
#
# Sections, most important first; no argument runs them all in this order:
#   tests        GPU correctness tests of the kernel (fixed configs: tuning each shape is slow)
#   headline     op suite, the two SDXL target cases the README quotes (autotuned; the gate checks the tuned kernel)
#   headline-pointer  the same rows with the pre-Hopper pointer kernel forced (CSA_KERNEL_PATH=pointer): what the
#                descriptor (TMA) path gains on this GPU
#   dit-op       op suite at FLUX.1-dev / SD3.5-large joint text+image shapes (1024², 768²; 2/4/8 frames), bf16
#   dit          one FLUX.1-dev and one SD3.5-large transformer step at 1024², 4 frames, stock vs ours, bf16
#   unet         one SDXL UNet step, official A / B / ours, and their banks
#   motion       compiled vs eager motion predictor
#   vram         profile-vram, bank modes
#   vram-window  profile-vram, window mode vs story length
#   vram-flux    profile-vram on random-flux (the real FLUX.1-dev transformer and VAE, random bf16 weights) at
#                1024²: ours / lockstep / window, stories of 4 and 8 frames, 4 steps (sized for ~2 minutes)
#   wan-dit      one Wan-1.3B transformer step (real config, random bf16 weights; two CFG passes) for a 3-shot 480p
#                story of 81-frame shots (32,760 tokens each), rate 0 (stock) vs 0.1 (estimated ~2 minutes)
#   wan-op       op suite at Wan shapes (benchmarks/bench_wan.py op): 1.3B / 14B, 480p, 81 frames, 3 shots, rates
#                0.05 / 0.1 / 0.25, ours vs official A (dense (3·32,760)² mask) and B (per-shot loop); a row whose
#                memory estimate exceeds the free GPU memory says so (estimated ~5 minutes: float64 gold per case)
#   vram-wan     profile-vram on random-wan (Wan-1.3B transformer and VAE, random bf16 weights): 2- and 4-shot 480p
#                stories of 81 frames, lockstep and stored banks at rate 0.1, 4 steps (estimated ~4 minutes)
#   wan14b-dit   one Wan-14B step (28.6 GB of bf16 weights), same story as wan-dit (estimated ~5 minutes: a call of
#                its own)
#   int8         op suite, the 8-bit path (issue #25; storydiff bench --suite op --size int8, fp16): ours_int8_triton
#                (precision="int8") vs ours_triton (16-bit) vs torch SDPA with the flash backend forced and the
#                sageattention package's Triton kernel, both dense over the same key length, at the headline SDXL
#                case (hd64, hd128), FLUX.1-dev 1024² 4 frames and Wan-1.3B 3 shots 480p rate 0.1 (hd128), with
#                cosine / relative L1 / max error against the float64 reference (estimated ~3 minutes, from FLOP
#                counts and autotuning both precisions per case: fits one call beside "tests headline"). The
#                machine has no network, so SageAttention's wheel travels with the working tree: put it in
#                benchmarks/wheels/ (a pure-Triton sageattention-1.x py3-none-any wheel, or a 2.x wheel built
#                for the machine's torch/CUDA) and the section runs
#                "pip install --no-deps benchmarks/wheels/sageattention-*.whl" first; without one it says so and
#                the sageattention rows read "n/a: ... does not import".
# One device call runs at most 10 minutes: all of it does not fit in one. Run "tests headline headline-pointer" first
# (the rows not measured yet), the rest in later calls ("wan-dit wan-op", then "vram-wan", then "wan14b-dit"); "tests
# headline int8" is sized for one call. No GPU run has timed these sections yet; the Wan and int8 estimates are from
# FLOP counts, not measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ALL=(tests headline headline-pointer dit-op dit unet motion vram vram-window vram-flux wan-dit wan-op vram-wan wan14b-dit int8)
if [ $# -gt 0 ]; then SECTIONS=("$@"); else SECTIONS=("${ALL[@]}"); fi
for name in "${SECTIONS[@]}"; do  # a typo fails now, not after the long sections before it
    case " ${ALL[*]} " in *" $name "*) ;; *) echo "unknown section '$name'; choose from: ${ALL[*]}"; exit 2 ;; esac
done
LOG="${OUT:+$OUT/session.log}"
LOG="${LOG:-/dev/null}"

# SageAttention for the int8 section, from a wheel carried in benchmarks/wheels/ (never downloaded: no network)
install_sageattention() {
    local wheels=(benchmarks/wheels/sageattention-*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no benchmarks/wheels/sageattention-*.whl: the sageattention rows will say it is not installed"
        return
    fi
    # the newest version when several are there (one pip call with two would conflict)
    local wheel
    wheel=$(printf '%s\n' "${wheels[@]}" | sort -V | tail -1)
    python3 -m pip install --no-deps --no-index "$wheel" 2>&1 | tail -2
}

section() {
    case "$1" in
        tests) CSA_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_gpu.py 2>&1 | tail -15 ;;
        headline) python3 -m storydiff.cli bench --suite op --size headline ;;
        headline-pointer) CSA_KERNEL_PATH=pointer python3 -m storydiff.cli bench --suite op --size headline ;;
        dit-op) python3 -m storydiff.cli bench --suite op --size dit ;;
        dit) python3 -m storydiff.cli bench --suite dit --model all ;;
        unet) python3 -m storydiff.cli bench --suite unet ;;
        motion) python3 -m storydiff.cli bench --suite motion ;;
        vram) python3 -m storydiff.cli profile-vram --modes official_b,ours,ours_offload,window --lengths 4,8,16 --steps 10 ;;
        vram-window) python3 -m storydiff.cli profile-vram --modes window,window_unchunked --lengths 8,32,128,256 --steps 4 --size 768 ;;
        vram-flux) python3 -m storydiff.cli profile-vram --model random-flux --modes ours,ours_lockstep,window --lengths 4,8 --steps 4 ;;
        wan-dit) python3 benchmarks/bench_wan.py dit wan 81 ;;
        wan-op) python3 benchmarks/bench_wan.py op ;;
        vram-wan) python3 benchmarks/bench_wan.py vram random-wan 4 ;;
        wan14b-dit) python3 benchmarks/bench_wan.py dit wan14b 81 ;;
        int8) install_sageattention; python3 -m storydiff.cli bench --suite op --size int8 ;;
    esac
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"
} 2>&1 | tee -a "$LOG"
for name in "${SECTIONS[@]}"; do
    start=$SECONDS
    echo "=== $name" | tee -a "$LOG"
    section "$name" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$LOG"
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" benchmarks/results; fi  # the device tool returns at most 8 files
done
