# Ahead-of-time compilation of the Triton kernels into cubins, embedded in a generated C++ source.
# Needs Python with triton at build time only; no GPU and no driver. build_aot.py caches each
# compiled variant and rewrites its outputs only when their content changes, so a rebuild after an
# unrelated edit compiles nothing.
find_package(Python3 REQUIRED COMPONENTS Interpreter)

set(ROPE_AOT_DIR "${CMAKE_CURRENT_BINARY_DIR}/aot")
# Compiled variants are cached by content (kernel source, Triton version, arch, spec), written
# atomically, so one cache can be shared by several build trees.
set(ROPE_AOT_CACHE_DIR "${CMAKE_CURRENT_BINARY_DIR}/aot_cache" CACHE PATH "Cache of compiled kernel variants")
set(ROPE_AOT_TABLE_SOURCE "${ROPE_AOT_DIR}/rope_kernel_table.cpp")
string(REPLACE ";" "," _rope_archs "${ROPE_CUDA_ARCHS}")
set(_rope_aot_jobs)
if(NOT ROPE_AOT_JOBS STREQUAL "0")
  set(_rope_aot_jobs --jobs ${ROPE_AOT_JOBS})
endif()

# Runs on every build (about a second when nothing changed): the step's real inputs include the
# installed Triton version and its settings, which a file dependency cannot see. The outputs are
# byproducts rewritten only when their content changes, so nothing downstream recompiles needlessly.
add_custom_target(rope_aot_kernels
  COMMAND "${Python3_EXECUTABLE}" -m kernels.build_aot
          --out-dir "${ROPE_AOT_DIR}" --cache-dir "${ROPE_AOT_CACHE_DIR}"
          --archs "${_rope_archs}" ${_rope_aot_jobs}
  WORKING_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}"
  BYPRODUCTS "${ROPE_AOT_TABLE_SOURCE}" "${ROPE_AOT_DIR}/aot_manifest.json"
  COMMENT "Compiling the Triton kernels ahead of time (sm ${_rope_archs})"
  USES_TERMINAL
  VERBATIM)
