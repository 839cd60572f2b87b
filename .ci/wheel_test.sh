#!/usr/bin/env bash
# The wheel as a user gets it: build it (and the sdist, and a wheel from the sdist), check what
# they hold, install the wheel into a fresh environment that has torch but neither Triton nor a
# compiler, and run it there: import, `python -m rope_kernels`, the CPU tests.
#
#   PYTHON=.venv/bin/python bash .ci/wheel_test.sh
#
# PYTHON: a python with the build requirements (requirements-dev.txt, plus build and twine).
# The in-tree build directory (ROPE_BUILD_DIR, default build/cmake) is reused when warm; the
# sdist build shares the tree's compiled-kernel cache (ROPE_AOT_CACHE_DIR, default build/aot_cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
build_dir=${ROPE_BUILD_DIR:-build/cmake}
export ROPE_AOT_CACHE_DIR=${ROPE_AOT_CACHE_DIR:-$PWD/build/aot_cache}
work=$(mktemp -d "${TMPDIR:-/tmp}/rope_wheel_test.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo; echo "== wheel test: $* ($SECONDS s)"; }
# Runs a command with its output kept aside, shown only when it fails.
quietly() { "$@" > "$work/last.log" 2>&1 || { tail -60 "$work/last.log"; return 1; }; }

for module in build twine; do
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

# A fresh environment with the torch the wheel was built for and nothing else: torch depends on
# Triton on Linux, so it comes along and is removed, as a user without it would have it.
step "fresh environment with torch only"
torch_version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('torch'))")
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
# The test suite's own needs come too: pytest, hypothesis (the property-based tests), and
# transformers for the model-compatibility tests (at the version requirements-dev.txt pins). None
# is a run-time dependency of the wheel.
transformers_requirement=$(grep -E '^transformers' requirements-dev.txt)
quietly "$venv_python" -m pip install "torch==$torch_version" pytest hypothesis "$transformers_requirement"
# With its dependencies: the wheel's torch requirement must accept the torch that is there.
quietly "$venv_python" -m pip install "$wheel"
quietly "$venv_python" -m pip uninstall -y triton
"$venv_python" -m pip list 2>/dev/null | grep -E "^(torch|triton|rope-kernels) " || true

# The tests run from a copy, in a directory of their own: the source tree is not on the path.
cp -r tests "$work/tests"
rm -rf "$work/tests/__pycache__"
mkdir -p "$work/home"
# Nothing from this environment: no PYTHONPATH, no build settings, and a PATH with no compiler.
in_venv() { (cd "$work" && env -i HOME="$work/home" PATH="$work/venv/bin" LANG=C.UTF-8 TMPDIR="$work" "$@"); }

in_venv python - <<'EOF'
import importlib.metadata, pathlib, shutil, sys
found = [tool for tool in ("cc", "c++", "gcc", "g++", "clang", "nvcc", "ptxas") if shutil.which(tool)]
assert not found, f"compilers on PATH: {found}"
try:
    import triton
    sys.exit(f"triton is importable from {triton.__file__}")
except ImportError:
    pass
import rope_kernels
where = pathlib.Path(rope_kernels.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"rope_kernels imported from {where}"
versions = {importlib.metadata.version("rope-kernels"), rope_kernels.__version__, rope_kernels.build_info()["version"]}
assert len(versions) == 1, f"versions disagree: {versions}"
print(f"imported rope_kernels {rope_kernels.__version__} from {where.parent}; no triton, no compiler")
EOF

step "python -m rope_kernels (fresh environment)"
in_venv python -m rope_kernels

step "python -m rope_kernels.cubins (fresh environment)"
in_venv python -m rope_kernels.cubins

# Inductor turns graphs into C++ for the CPU and needs a compiler for that, with or without
# rope_kernels, so its cases (the inductor backend, max-autotune, AOTInductor packages) cannot
# run here; the other torch.compile and export cases do.
step "CPU tests against the installed wheel"
in_venv python -m pytest -q -ra -p no:cacheprovider --rootdir "$work/tests" "$work/tests" -k "not inductor and not max_autotune and not aoti"
echo "wheel test passed in $SECONDS s"
