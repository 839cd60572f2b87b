#!/usr/bin/env bash
# On a GPU machine with no package registry: build the wheel against the torch installed there,
# install it into a fresh environment, and run the whole test suite (GPU tests included) and
# `python -m rope_kernels` against the installed wheel, not the source tree.
#
#   bash .ci/gpu_wheel_test.sh            # PYTHON=python3: the python (and torch) to build for
#   bash .ci/gpu_wheel_test.sh WHEEL      # or a release wheel built elsewhere (.ci/release_wheels.py)
#
# PYTEST_ARGS: more pytest arguments (e.g. "-n 16 --dist loadfile" with pytest-xdist);
# PYTEST_K: a -k expression choosing the tests.
#
# Nothing can be downloaded there, so the fresh environment is a new venv that also sees the
# packages of $PYTHON (torch, Triton, pytest), wherever they are: the system, a venv or conda
# (`venv --system-site-packages` would see only the base interpreter's). The wheel goes into the
# new venv's own site-packages, which come first on the path; the script checks that the
# rope_kernels it imports is that one.
# A warm build tree (ROPE_BUILD_DIR, default build/cmake, e.g. from an earlier
# `pip install --no-build-isolation -e .`) makes the wheel build a matter of seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/rope_gpu_wheel_test.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo; echo "== GPU wheel test: $* ($SECONDS s)"; }
quietly() { "$@" > "$work/last.log" 2>&1 || { tail -60 "$work/last.log"; return 1; }; }

step "build tools"
"$PYTHON" - <<'EOF'
import importlib.metadata as m, platform
import torch
names = ["torch", "triton", "setuptools", "wheel", "pip", "pytest"]
print(f"Python {platform.python_version()}; " + ", ".join(f"{n} {m.version(n)}" for n in names))
print(f"CUDA devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
EOF

if [ $# -ge 1 ]; then
  wheel=$(realpath "$1")
  step "release wheel $(basename "$wheel")"
  "$PYTHON" .ci/check_distributions.py --wheel "$wheel" --manylinux
else
  step "pip wheel --no-build-isolation --no-deps ."
  quietly "$PYTHON" -m pip wheel --no-build-isolation --no-deps . -w "$work/dist"
  wheel=$(ls "$work"/dist/*.whl)
  "$PYTHON" .ci/check_distributions.py --wheel "$wheel"
fi
"$PYTHON" python/rope_kernels/cubins.py "$wheel"

step "fresh environment: a venv over the packages of $PYTHON, with the wheel installed in it"
"$PYTHON" -m venv --without-pip "$work/venv"
venv_python="$work/venv/bin/python"
venv_site=$("$venv_python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# A .pth file adds those directories after the venv's own, with their own .pth files processed.
"$PYTHON" - > "$venv_site/_base_packages.pth" <<'EOF'
import site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
for directory in dirs:
    print(f"import site; site.addsitedir({directory!r})")
EOF
# The venv's python runs the base pip, which installs into the venv. No index: nothing to
# download; no dependencies: torch is the base's, and pip check below tests the requirement;
# --ignore-installed: a rope_kernels of the base environment is left alone (the venv's comes first).
quietly "$venv_python" -m pip install --no-index --no-deps --ignore-installed "$wheel"
if "$venv_python" -m pip check 2>/dev/null | grep -i "^rope-kernels"; then
  echo "error: the wheel's requirements are not met by this environment" >&2
  exit 1
fi

cp -r tests "$work/tests"
rm -rf "$work/tests/__pycache__"
# From a directory of its own, without PYTHONPATH: the source tree is not on the path.
in_venv() { (cd "$work" && env -u PYTHONPATH "$@"); }
in_venv "$venv_python" - <<'EOF'
import importlib.metadata, pathlib, sys
import rope_kernels
where = pathlib.Path(rope_kernels.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"rope_kernels imported from {where}, not the venv"
versions = {importlib.metadata.version("rope-kernels"), rope_kernels.__version__, rope_kernels.build_info()["version"]}
assert len(versions) == 1, f"versions disagree: {versions}"
print(f"imported rope_kernels {rope_kernels.__version__} from {where.parent}")
EOF

step "python -m rope_kernels (installed wheel)"
in_venv "$venv_python" -m rope_kernels

step "the test suite against the installed wheel"
in_venv "$venv_python" -m pytest -q -ra -p no:cacheprovider --rootdir "$work/tests" ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} "$work/tests"

step "size"
wheel_bytes=$(stat -c %s "$wheel")
echo "wheel $(basename "$wheel"): $wheel_bytes bytes ($(( wheel_bytes / 1024 / 1024 )) MiB)"
echo "GPU wheel test passed in $SECONDS s"
