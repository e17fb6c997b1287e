#!/usr/bin/env bash
# Issue 17's figures for quantized LLM weights (fp8, int4, int8), full-size random weights, in two parts
# that each fit one 10-minute GPU call:
#   bash bench/quant_suite.sh OUT_DIR llm   # bench/llm.py --quant-only: bf16, fp8, int4, int8 both ways (~9 min)
#   bash bench/quant_suite.sh OUT_DIR e2e   # bench/e2e.py: whole demo memory with int4 at 4 conversations (one process),
#                                           # TTFA with fp8 beside bf16 (~8 min)
#   bash bench/quant_suite.sh OUT_DIR fp8   # bench/llm.py: fp8:one_row against fp8:dynamic and bf16, and the
#                                           # "fp8 decision" line (run it twice: the bar needs two runs)
# Each command's last lines (llm.log: "--- quantized weights ---"; e2e_*.log and the JSON "memory" and
# "ttfa" sections) hold the figures docs/perf/llm.md and docs/PERFORMANCE.md record.
set -uo pipefail
out="${1:?usage: bash bench/quant_suite.sh OUT_DIR llm|fp8|e2e}"
part="${2:?usage: bash bench/quant_suite.sh OUT_DIR llm|fp8|e2e}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

case "$part" in
llm)
    # bf16 and the variants with the same engine settings and random weights; fp8 and int4 first, so that
    # a run the budget cuts short still has the bars (the int8 decision then needs: --quant int8:torchao,int8:fused)
    python bench/llm.py --quant-only --budget-s 560 --out "$out/llm_quant.json" > "$out/llm.log" 2>&1
    echo "llm: exit $?"
    sed -n '/=== headline ===/,$p' "$out/llm.log"
    ;;
fp8)
    python bench/llm.py --quant-only --quant fp8:dynamic,fp8:one_row --budget-s 560 --out "$out/llm_fp8.json" \
        > "$out/llm_fp8.log" 2>&1
    echo "llm fp8: exit $?"
    sed -n '/=== headline ===/,$p' "$out/llm_fp8.log"
    ;;
e2e)
    # 1. the whole demo (engine + speech tokenizer + decoder) with int4 at 4 conversations, each stream
    #    with the default 8192-token KV cache, decoder graphs for up to 4 blocks (launch --dtype int4
    #    --max-concurrent-turns 4 --layout one-process): memory.both_processes_gb (one process here; with
    #    --layout two-process it adds the token server's process)
    python bench/e2e.py --layout one-process --llm-dtype int4 --levels 4 --max-seq-len 8192 --repeats 5 --answer-seconds 10 \
        --unbatched-level 0 --budget-s 240 --out "$out/e2e_int4.json" --server-log "$out/e2e_int4_server.log" \
        > "$out/e2e_int4.log" 2>&1
    echo "e2e int4: exit $?"
    # 2. TTFA, one user, fp8 then bf16 (same machine, same settings)
    for dtype in fp8 bfloat16; do
        python bench/e2e.py --llm-dtype "$dtype" --levels 1 --repeats 5 --answer-seconds 6 --no-reference \
            --unbatched-level 0 --budget-s 150 --out "$out/e2e_$dtype.json" --server-log "$out/e2e_${dtype}_server.log" \
            > "$out/e2e_$dtype.log" 2>&1
        echo "e2e $dtype: exit $?"
    done
    python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("int4", "fp8", "bfloat16"):
    path = out / f"e2e_{name}.json"
    if not path.exists():
        print(f"{name}: no result")
        continue
    r = json.loads(path.read_text())
    memory, ttfa = r.get("memory", {}), r.get("ttfa", {})
    print(f"{name}: TTFA median {ttfa.get('ttfa')} s (tokens to first block {ttfa.get('tokens_to_first_block')} s); "
          f"GPU memory of the demo's processes {memory.get('both_processes_gb')} GB at {memory.get('levels')} conversations")
EOF
    ;;
*)
    echo "part must be llm, fp8 or e2e, not $part" >&2
    exit 2
    ;;
esac
