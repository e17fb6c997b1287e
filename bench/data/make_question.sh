#!/usr/bin/env bash
# Regenerate question_5s.wav (16 kHz mono, ~5.0 s), the spoken question of bench/e2e.py, with espeak-ng and sox.
set -euo pipefail
cd "$(dirname "$0")"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en-us -s 142 -w "$tmp/q.wav" "Hello! Could you tell me how to make a good cup of coffee at home?"
sox "$tmp/q.wav" -r 16000 -c 1 -b 16 question_5s.wav
