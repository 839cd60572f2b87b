#!/usr/bin/env bash
# One wheel as a user gets it: installed into a fresh environment that has the given torch and
# neither Triton nor a compiler, then run there: import, `python -m rope_kernels`, the CPU tests.
#
#   PYTHON=.venv/bin/python bash .ci/fresh_env_test.sh WHEEL TORCH_VERSION
#
# PYTHON makes the environment (its venv module). TORCH_VERSION is what pip installs
# (torch==TORCH_VERSION: 2.13.0 also takes a 2.13.0+cpu build where the index has one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
wheel=$(realpath "$1")
torch_version=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/rope_fresh_env.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo; echo "== fresh environment, torch $torch_version: $* ($SECONDS s)"; }
quietly() { "$@" > "$work/last.log" 2>&1 || { tail -60 "$work/last.log"; return 1; }; }

# torch depends on Triton on Linux, so it comes along and is removed, as a user without it would
# have it. The test suite's own needs come too: pytest, hypothesis (the property-based tests), and
# transformers for the model-compatibility tests (at the version requirements-dev.txt pins). None
# is a run-time dependency of the wheel.
step "install $(basename "$wheel")"
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
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

in_venv python - "$torch_version" <<'PY'
import importlib.metadata, pathlib, shutil, sys
import torch
found = [tool for tool in ("cc", "c++", "gcc", "g++", "clang", "nvcc", "ptxas") if shutil.which(tool)]
assert not found, f"compilers on PATH: {found}"
try:
    import triton
    sys.exit(f"triton is importable from {triton.__file__}")
except ImportError:
    pass
assert torch.__version__.split("+")[0] == sys.argv[1].split("+")[0], f"torch {torch.__version__}, not {sys.argv[1]}"
import rope_kernels
where = pathlib.Path(rope_kernels.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"rope_kernels imported from {where}"
versions = {importlib.metadata.version("rope-kernels"), rope_kernels.__version__, rope_kernels.build_info()["version"]}
assert len(versions) == 1, f"versions disagree: {versions}"
info = rope_kernels.build_info()
print(f"imported rope_kernels {rope_kernels.__version__} from {where.parent} with torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}); GPU kernels for sm {info['architectures']}, PTX of sm_{info['ptx_architecture']}; "
      "no triton, no compiler")
PY

step "python -m rope_kernels"
in_venv python -m rope_kernels

step "python -m rope_kernels.cubins"
in_venv python -m rope_kernels.cubins

# Inductor turns graphs into C++ for the CPU and needs a compiler for that, with or without
# rope_kernels, so its cases (the inductor backend, max-autotune, AOTInductor packages) cannot
# run here; the other torch.compile and export cases do.
step "CPU tests against the installed wheel"
in_venv python -m pytest -q -ra -p no:cacheprovider --rootdir "$work/tests" "$work/tests" -k "not inductor and not max_autotune and not aoti"
echo "fresh environment test of $(basename "$wheel") with torch $torch_version passed in $SECONDS s"
