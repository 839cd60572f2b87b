#!/usr/bin/env bash
# The build needs nothing but pip: it runs the cmake and ninja of its build requirements (the
# Python packages in the venv), not whatever PATH has, and a rebuild after switching between an
# activated and a non-activated venv recompiles nothing.
#
#   bash .ci/build_tools_test.sh      # after the README's build (.venv, a warm build/cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/rope_build_tools.XXXXXX")
trap 'rm -rf "$work"' EXIT
build_dir=${ROPE_BUILD_DIR:-build/cmake}

# cmake and ninja on PATH that fail loudly if anything runs them.
mkdir -p "$work/decoys"
for tool in cmake ninja; do
  printf '#!/bin/sh\necho "decoy %s on PATH was run" >&2\nexit 97\n' "$tool" > "$work/decoys/$tool"
  chmod +x "$work/decoys/$tool"
done

rebuild() { .venv/bin/pip install -q --no-build-isolation --no-deps -e . > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }; }
compiled_since() { find "$build_dir" -name '*.o' -newer "$work/stamp" | sort; }

touch "$work/stamp"
echo "== rebuild with decoy cmake and ninja first on PATH"
PATH="$work/decoys:$PATH" rebuild
grep -q "decoy" "$work/build.log" && { echo "error: the build ran a decoy" >&2; exit 1; }
changed=$(compiled_since)

touch "$work/stamp"
echo "== rebuild in the activated venv"
PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv" rebuild
again=$(compiled_since)

touch "$work/stamp"
echo "== rebuild outside it again"
rebuild
back=$(compiled_since)

if [ -n "$changed$again$back" ]; then
  echo "error: a rebuild with nothing changed recompiled:" >&2
  printf '%s\n' $changed $again $back >&2
  exit 1
fi
grep -E "^CMAKE_COMMAND|^CMAKE_MAKE_PROGRAM" "$build_dir/CMakeCache.txt"
echo "build tools test passed: no PATH tool used, nothing recompiled ($SECONDS s)"
