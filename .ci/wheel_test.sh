#!/usr/bin/env bash
# The wheels as users get them: build the wheel (and the sdist, and a wheel from the sdist) and
# check what they hold; build the release wheels for two torch releases from one kernel build
# (.ci/release_wheels.py: manylinux, one per torch series); install each into a fresh environment
# with its torch and neither Triton nor a compiler, and run it there (.ci/fresh_env_test.sh).
#
#   PYTHON=.venv/bin/python bash .ci/wheel_test.sh
#
# PYTHON: a python with the build requirements (requirements-dev.txt). ROPE_RELEASE_TORCH: the
# torch releases of the release wheels (default: this PYTHON's torch and 2.13.0).
# The in-tree build directory (ROPE_BUILD_DIR, default build/cmake) is reused when warm; the
# sdist build shares the tree's compiled-kernel cache (ROPE_AOT_CACHE_DIR, default build/aot_cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export ROPE_AOT_CACHE_DIR=${ROPE_AOT_CACHE_DIR:-$PWD/build/aot_cache}
work=$(mktemp -d "${TMPDIR:-/tmp}/rope_wheel_test.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo; echo "== wheel test: $* ($SECONDS s)"; }
# Runs a command with its output kept aside, shown only when it fails.
quietly() { "$@" > "$work/last.log" 2>&1 || { tail -60 "$work/last.log"; return 1; }; }

for module in build twine auditwheel; do
  "$PYTHON" -c "import $module" 2>/dev/null || { echo "error: $PYTHON lacks '$module' (pip install $module)" >&2; exit 1; }
done

step "pip wheel --no-build-isolation --no-deps ."
quietly "$PYTHON" -m pip wheel --no-build-isolation --no-deps . -w "$work/pip"
wheel=$(ls "$work"/pip/*.whl)
echo "$wheel: $(du -h "$wheel" | cut -f1)"

step "python -m build --no-isolation --wheel"
quietly "$PYTHON" -m build --no-isolation --wheel --outdir "$work/build" .

# A wheel built from the sdist proves that the sdist holds everything the build needs. It is a
# full C++ build in a fresh tree; the Triton kernels come from the shared cache.
step "python -m build --no-isolation --sdist, and a wheel from the sdist"
quietly "$PYTHON" -m build --no-isolation --sdist --outdir "$work/sdist" .
sdist=$(ls "$work"/sdist/*.tar.gz)
# Its build directory is its own: the default one, inside the unpacked sdist.
(unset ROPE_BUILD_DIR; MAX_JOBS=${MAX_JOBS:-2} quietly "$PYTHON" -m pip wheel --no-build-isolation --no-deps "$sdist" -w "$work/from_sdist")

step "contents, metadata, and the op library's dynamic section"
"$PYTHON" .ci/check_distributions.py --wheel "$wheel" --sdist "$sdist" --same-files-as "$work"/build/*.whl
"$PYTHON" .ci/check_distributions.py --wheel "$work"/from_sdist/*.whl --same-files-as "$wheel"
"$PYTHON" -m twine check --strict "$wheel" "$sdist"

step "cubins in the wheel"
"$PYTHON" python/rope_kernels/cubins.py "$wheel"


this_torch=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('torch'))")
read -r -a release_torch <<< "${ROPE_RELEASE_TORCH:-${this_torch%%+*} 2.13.0}"
step "release wheels for torch ${release_torch[*]}, from one kernel build"
"$PYTHON" .ci/release_wheels.py "${release_torch[@]/#/--torch=}" --out "$work/dist" --work "$PWD/build/release"
ls -l "$work"/dist/*/*.whl

for version in "${release_torch[@]}"; do
  series=$(echo "$version" | cut -d. -f1,2)
  bash .ci/fresh_env_test.sh "$work/dist/torch-$series"/*.whl "$version"
done
echo "wheel test passed in $SECONDS s"
