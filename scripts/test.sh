#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: system packages, Python packages, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k protocol`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian packages the tests use: chromium (browser tests), espeak-ng and sox (spoken test inputs),
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
# a CJK font, so that browser screenshots of Mandarin text are readable
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need+=(fonts-wqy-microhei)
if [ ${#need[@]} -gt 0 ]; then
  echo "[test] installing ${need[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# the optional Ray Serve deployment (requirements-serve.txt) is tested too: installed, and required
export GLM4VOICE_EXTRA_REQUIREMENTS="${GLM4VOICE_EXTRA_REQUIREMENTS:-requirements-serve.txt}"
source "$ROOT/scripts/env.sh"
export GLM4VOICE_REQUIRE_BROWSER="${GLM4VOICE_REQUIRE_BROWSER:-1}"
export GLM4VOICE_REQUIRE_RAY="${GLM4VOICE_REQUIRE_RAY:-1}"
# lint and types first (seconds): ruff check, ruff format --check, mypy (GLM4VOICE_SKIP_LINT=1 skips them)
[ "${GLM4VOICE_SKIP_LINT:-0}" = 1 ] || bash "$ROOT/scripts/lint.sh"
# pytest exits 5 when it collects no tests: that is a failure here, as is any failing test.
exec python -m pytest "$@"
