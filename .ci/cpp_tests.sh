#!/usr/bin/env bash
# CI, the C++ side: install the op library (the build setup.py made, or a fresh one) into a
# prefix, build tests/cpp against it as a separate CMake project (find_package(RopeKernels)),
# and run CTest. On a machine with a GPU the same tests also run on CUDA.
#
# Environment: PYTHON (default python3): a Python with torch, and with rope_kernels importable
# or built in place in python/ (it writes the test fixtures); ROPE_BUILD_DIR (default build/cmake):
# the library's build tree; MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
build_dir=${ROPE_BUILD_DIR:-build/cmake}
install_prefix=$PWD/build/cpp/install
tests_dir=build/cpp/tests
jobs=${MAX_JOBS:-2}
torch_prefix=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")

python_executable=$("$PYTHON" -c 'import sys; print(sys.executable)')
# The CMake and Ninja of the build requirements, as setup.py runs them (PATH's where they are missing).
bin_of() { "$PYTHON" -c "import os, $1; print(os.path.join($2, '$3'))" 2>/dev/null || command -v "$3"; }
cmake=$(bin_of cmake cmake.CMAKE_BIN_DIR cmake)
ctest=$(bin_of cmake cmake.CMAKE_BIN_DIR ctest)
ninja=$(bin_of ninja ninja.BIN_DIR ninja)

if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  echo "cpp_tests: no library build in $build_dir; configuring one"
  "$cmake" -S . -B "$build_dir" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$torch_prefix" -DPython3_EXECUTABLE="$python_executable" \
        ${ROPE_AOT_CACHE_DIR:+-DROPE_AOT_CACHE_DIR="$ROPE_AOT_CACHE_DIR"}
fi
# Up to date after setup.py's build: this only checks (about a second for the kernel step).
"$cmake" --build "$build_dir" --target rope_kernels_ops -j "$jobs"
rm -rf "$install_prefix"
"$cmake" --install "$build_dir" --prefix "$install_prefix"

# AOTInductor compiles CUDA packages against CUDA_HOME: the toolkit the library was configured with.
cuda_root=$(sed -n 's/^CUDAToolkit_ROOT:[A-Z]*=//p' "$build_dir/CMakeCache.txt" | head -n 1)
if [ -n "$cuda_root" ]; then
  export CUDA_HOME=${CUDA_HOME:-$cuda_root}
fi
if ! "$PYTHON" -c "import rope_kernels" 2>/dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

# As docs/cpp.md's program is configured: the package finds torch, and torch's config the CUDA
# toolkit, with nothing but the prefixes.
"$cmake" -S tests/cpp -B "$tests_dir" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$install_prefix;$torch_prefix" -DPython3_EXECUTABLE="$python_executable"
"$cmake" --build "$tests_dir" -j "$jobs"
"$ctest" --test-dir "$tests_dir" --output-on-failure -j "$jobs"
