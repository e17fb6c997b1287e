# Sourced by scripts/demo.sh and scripts/test.sh: make a virtual environment in .venv with
# everything in requirements.txt, plus the optional files named in GLM4VOICE_EXTRA_REQUIREMENTS
# (space-separated, relative to the repository; scripts/test.sh names requirements-serve.txt).
# Reinstalled only when one of those files changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GLM4VOICE_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
requirements=("$ROOT/requirements.txt")
for extra in ${GLM4VOICE_EXTRA_REQUIREMENTS:-}; do requirements+=("$ROOT/$extra"); done
stamp="$VENV/.requirements.sha256"
want="$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing ${requirements[*]#"$ROOT/"} into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${requirements[@]/#/-r}"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
