#!/usr/bin/env bash
# Builds tasksieve against the torch of another venv (vLLM's, kvpress's, lm-eval's) and installs
# it there as a regular (non-editable) package.
#
#   tools/install_into_venv.sh VENV [extra pip args]
#
# The build runs in a copy of the sources: an in-place build would overwrite the main venv's
# python/tasksieve/_C*.so and _build_info.py, which were built against a different torch.
# CPU-only (TASKSIEVE_CUDA=0) unless TASKSIEVE_CUDA is set: the side venvs run vLLM's or
# kvpress's CPU builds here.
set -euo pipefail
venv=$(cd "${1:?usage: tools/install_into_venv.sh VENV}" && pwd)
shift
root=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
test -x "$py" || { echo "install_into_venv: no python at $py" >&2; exit 1; }
stage=$(mktemp -d "${TMPDIR:-/tmp}/tasksieve-build.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# Only what the build reads: no build/ folders, venvs or compiled objects of the main tree.
cp -r "$root/csrc" "$root/setup.py" "$root/pyproject.toml" "$root/README.md" "$stage/"
mkdir -p "$stage/python"
cp -r "$root/python/tasksieve" "$stage/python/"
find "$stage/python" \( -name '*.so' -o -name '__pycache__' -o -name '_build_info.py' \) -prune \
    -exec rm -rf {} +
"$py" -m pip install -q "setuptools>=77" wheel ninja
(cd "$stage" && TASKSIEVE_CUDA="${TASKSIEVE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$py" -m pip install -q --no-build-isolation --no-deps "$@" .)
"$py" -c "import tasksieve, torch; print('tasksieve', tasksieve.__version__, 'built against torch', torch.__version__, 'in', '$venv')"
