#!/usr/bin/env bash
# Regenerate the two sample prompts (16 kHz mono wav) with espeak-ng and sox.
set -euo pipefail
cd "$(dirname "$0")"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp/en.wav" "Hello! Can you tell me a short story about a cat, please?"
espeak-ng -v cmn -s 150 -w "$tmp/zh.wav" "你好，请给我讲一个关于小猫的简短故事。"
sox "$tmp/en.wav" -r 16000 -c 1 -b 16 sample_en.wav
sox "$tmp/zh.wav" -r 16000 -c 1 -b 16 sample_zh.wav
