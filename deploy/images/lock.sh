#!/usr/bin/env bash
# Regenerates the images' lock files (`make lock`): every Python package of each image, pinned
# with ==, with the sha256 of every file the index holds for that version. The Dockerfile
# installs them with `pip install --require-hashes --no-deps -r <lock>`.
#
#   serve.lock.txt          project + [cpu]            CPython 3.11 (the python:3.11 base)
#   serve-gpu.lock.txt      project + [gpu]            CPython 3.12 (Ubuntu 24.04's python3)
#   calibrate.lock.txt      project + [torch,cpu]      CPython 3.11, torch==2.13.0+cpu
#   calibrate-gpu.lock.txt  project + [torch,cpu]      CPython 3.11, torch==2.13.0 (CUDA wheel)
#
# Each also holds the build backend (build.in). Resolved for x86-64 Linux (manylinux_2_28).
#
# torch's CPU-only wheel (2.13.0+cpu) is not on the default index: name a source that has it,
#   TORCH_INDEX_URL=<index with torch's CPU wheels>  make lock    (as the Dockerfile's build-arg)
#   TORCH_FIND_LINKS=<folder or page holding the wheel>  make lock
# Without either, the three other locks are written and calibrate.lock.txt is left as it is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
uv="${UV:-uv}"
cd "$root"

compile() { # compile <lock> <python version> <extra uv arguments...>
  local lock="$1" python="$2"
  shift 2
  echo "lock: deploy/images/$lock" >&2
  "$uv" pip compile pyproject.toml deploy/images/build.in "$@" \
    --generate-hashes --python-version "$python" --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "make lock" --quiet --output-file "deploy/images/$lock"
}

compile serve.lock.txt 3.11 --extra cpu
compile serve-gpu.lock.txt 3.12 --extra gpu
compile calibrate-gpu.lock.txt 3.11 --extra torch --extra cpu deploy/images/torch-cuda.in

torch_source=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  torch_source=(--extra-index-url "$TORCH_INDEX_URL")
elif [[ -n "${TORCH_FIND_LINKS:-}" ]]; then
  torch_source=(--find-links "$TORCH_FIND_LINKS")
fi
if ((${#torch_source[@]})); then
  # unsafe-best-match: torch's index also mirrors some of PyPI's packages; every version of every
  # source is weighed, and the hashes pin the bytes whichever source serves them.
  compile calibrate.lock.txt 3.11 --extra torch --extra cpu deploy/images/torch-cpu.in \
    "${torch_source[@]}" --index-strategy unsafe-best-match
else
  echo "lock: calibrate.lock.txt left as it is: set TORCH_INDEX_URL or TORCH_FIND_LINKS" >&2
fi
