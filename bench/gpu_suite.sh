#!/usr/bin/env bash
# Every GPU figure of docs/PERFORMANCE.md in one go, full-size random weights:
#   bash bench/gpu_suite.sh OUT_DIR [E2E_LEVELS]
# 1. bench/e2e.py (TTFA breakdown, 30 s answer, concurrent conversations, reference-style pipeline);
# 2. bench/speech_tokenizer.py (throughput, codes changed by bf16 / TF32);
# 3. bench/server.py against the 9B-shaped token server (TTFT, per-stream and total tokens/s).
set -uo pipefail
out="${1:?usage: bash bench/gpu_suite.sh OUT_DIR [E2E_LEVELS]}"
levels="${2:-1,16,32,48,64}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

python bench/e2e.py --layout two-process --levels "$levels" --out "$out/e2e.json" --server-log "$out/e2e_server.log" --budget-s 330 \
    > "$out/e2e.log" 2>&1
echo "e2e: exit $?"

timeout 150 python -m bench.speech_tokenizer --compare-dtypes > "$out/speech_tokenizer.log" 2>&1
echo "speech tokenizer: exit $?"

tokenizer_dir="$(mktemp -d)"
python -c "import sys; from pathlib import Path; from glm4voice.checkpoints.text import write_tiny_text_tokenizer as w; w(Path(sys.argv[1]))" "$tokenizer_dir"
port=18123
python bench/e2e_server.py --port "$port" --tokenizer-dir "$tokenizer_dir" --no-reference > "$out/server_bench_server.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
    python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/health" 2> /dev/null && break
    sleep 1
done
timeout 200 python -m bench.server --url "http://127.0.0.1:$port" --concurrency 1,8,32,64 --requests 64 \
    --max-new-tokens 256 --json "$out/server.json" > "$out/server.log" 2>&1
echo "server: exit $?"
kill "$server"
wait "$server" 2> /dev/null
rm -rf "$tokenizer_dir"
