#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with `.gpu` and `.gl` carried there (made by
# scripts/gpu-bundle.sh): the CubeCL test binaries on the GPU, then the benchmarks. Logs and JSON
# lines go to $OUT (or /tmp/gpu-out). What to run is the first argument:
#   tests   the kernel tests with GRAIL_TEST_DEVICE (default vulkan): every fused op, fixture
#           parity, generation, and honest completions generated there verified on Flex (the
#           sketch and log-prob drift)
#   small   trainer-step on the 5M CPU-bench model: fused on / off, packing off, own GEMM
#   qwen    trainer-step and rollout on the Qwen2-0.5B shape (hidden 896, 24 layers, 14/2 heads,
#           inter 4864, vocab 151936)
#   ops     the per-op benches (fused vs unfused)
# Several may follow each other: `scripts/gpu-check.sh tests small`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
device="${GRAIL_TEST_DEVICE:-vulkan}"

if ! ldconfig -p | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -e "$nvidia_icd" ] && export VK_DRIVER_FILES="$nvidia_icd"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

bundle=/tmp/grail-gpu
if [ ! -x "$bundle/bin/grail-bench" ]; then
  mkdir -p "$bundle" && tar -C "$bundle" -xJf .gpu/bundle.tar.xz
fi
export GRAIL_FIXTURES="$bundle/fixtures"
bench="$bundle/bin/grail-bench"
qwen=(--hidden 896 --layers 24 --heads 14 --kv-heads 2 --inter 4864 --vocab 151936)

for what in "${@:-tests}"; do
  case "$what" in
    tests)
      for t in ops model_parity generation; do
        echo "== $t on $device"
        GRAIL_TEST_DEVICE="$device" "$bundle/bin/$t" 2>&1 | tee "$out/test-$t.log"
      done
      echo "== verify: completions from $device checked on Flex"
      GRAIL_TEST_DEVICE="$device" "$bundle/bin/verify" another_backend --nocapture 2>&1 |
        tee "$out/test-verify.log"
      ;;
    small)
      for flags in "" "--no-fused-ops" "--no-packing" "--naive-logprob"; do
        # shellcheck disable=SC2086
        "$bench" --device "$device" trainer-step $flags | tee -a "$out/small.jsonl"
      done
      GRAIL_CUBE_GEMM=own "$bench" --device "$device" trainer-step | tee -a "$out/small-own-gemm.jsonl"
      ;;
    qwen)
      lens=512,448,384,320,512,256,192,128
      for flags in "" "--no-fused-ops"; do
        # shellcheck disable=SC2086
        "$bench" --device "$device" --reps 3 trainer-step "${qwen[@]}" --lens "$lens" \
          --prompt-len 64 --steps 3 --max-tokens-per-microbatch 4096 $flags | tee -a "$out/qwen.jsonl"
      done
      for batch in 1 32; do
        "$bench" --device "$device" rollout "${qwen[@]}" --batch "$batch" | tee -a "$out/qwen-rollout.jsonl"
      done
      ;;
    ops)
      for op in attention rms-norm swiglu rope linear; do
        for flags in "" "--unfused"; do
          # shellcheck disable=SC2086
          "$bench" --device "$device" op --op "$op" $flags | tee -a "$out/ops.jsonl"
        done
      done
      ;;
    *)
      echo "unknown part: $what (tests | small | qwen | ops)" >&2
      exit 2
      ;;
  esac
done
