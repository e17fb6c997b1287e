#!/usr/bin/env bash
# Start the demo: the model server and the web UI (http://localhost:8888 by default).
# With no checkpoint arguments it uses tiny random checkpoints (answers are noise).
# Arguments go to `python -m glm4voice.launch` (see --help), e.g.
#   bash scripts/demo.sh --model-path THUDM/glm-4-voice-9b --tokenizer-path THUDM/glm-4-voice-tokenizer \
#                        --flow-path THUDM/glm-4-voice-decoder --device cuda:0
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
exec python -m glm4voice.launch "$@"
