#!/usr/bin/env bash
# Prepares a GPU check for a machine that cannot build (no crates.io there): builds the
# `--features vulkan` test binaries and grail-bench here, strips and packs them with the fixtures
# into .gpu/bundle.tar.xz, and downloads the Vulkan loader packages into .gl/ (both ignored by
# git). Then carry `.gpu` and `.gl` to the GPU machine and run `scripts/gpu-check.sh` there.
# Takes ~35 minutes on 2 cores the first time (the release grail-bench build and xz dominate).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
fixtures="${GRAIL_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
[ -d "$fixtures/models" ] || { echo "error: no fixtures at $fixtures (set GRAIL_FIXTURES)" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" .gpu

echo "== test binaries (--features vulkan)"
cargo test -p grail-kernels -p grail-core -p grail-rollout \
  --features grail-kernels/vulkan,grail-core/vulkan,grail-rollout/vulkan \
  --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
wanted = {"ops", "model_parity", "generation", "verify"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = m["target"]["name"]
    if m["target"]["kind"] == ["test"] and name in wanted:
        shutil.copy(m["executable"], sys.argv[1] + "/bin/" + name)
        print("  " + name)
' "$stage"

echo "== grail-bench (release, --features vulkan)"
cargo build --release -p grail-benches --features vulkan --bin grail-bench
cp target/release/grail-bench "$stage/bin/"

strip "$stage"/bin/*
cp -r "$fixtures" "$stage/fixtures"
# The binaries share most of their code (burn, CubeCL, wgpu): a dictionary wider than one binary
# lets xz store it once (seven binaries: 99 MB at plain -6, 67 MB so). A device call carries at
# most 64 MiB, so the fused-model and kernel-unit test binaries stay behind (53 MB; the ops,
# parity, generation and verification tests cover the same kernels). One thread: ~8 minutes.
tar -C "$stage" -cf - bin fixtures | xz -6 --lzma2=preset=6,dict=768MiB -T1 >.gpu/bundle.tar.xz
ls -la .gpu/bundle.tar.xz

echo "== Vulkan loader packages (.gl), for a machine that has the driver but no loader"
mkdir -p .gl /tmp/amd64/partial
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
# shellcheck disable=SC2086
apt-get $o update -qq
# shellcheck disable=SC2086
(cd .gl && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
du -sh .gpu .gl
