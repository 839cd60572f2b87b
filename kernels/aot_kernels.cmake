# Ahead-of-time compilation of the Triton kernels into cubins, embedded in a generated C++ source.
# Needs Python with triton at build time only; no GPU and no driver. build_aot.py caches each
# compiled variant and rewrites its outputs only when their content changes, so a rebuild after an
# unrelated edit compiles nothing.
#
# Or, with ROPE_PREBUILT_KERNELS, the outputs of a kernel build made before (by any build tree, or
# `python -m kernels.build_aot --out-dir DIR`): no Triton, no Python. The kernels do not depend on
# torch, so one kernel build serves the library built against each torch release.
set(ROPE_PREBUILT_KERNELS "" CACHE PATH
    "Directory of a finished kernel build (its rope_kernel_table.cpp, cubins and manifest) to use instead of compiling the kernels")
# Compiled variants are cached by content (kernel source, Triton version, arch, spec), written
# atomically, so one cache is shared by every build tree of this source tree (the pip build's and
# the C++ route's) and can be shared wider.
set(ROPE_AOT_CACHE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/build/aot_cache" CACHE PATH "Cache of compiled kernel variants")

if(ROPE_PREBUILT_KERNELS)
  set(ROPE_AOT_DIR "${ROPE_PREBUILT_KERNELS}")
  include(kernels/prebuilt_kernels.cmake)
  rope_check_prebuilt_kernels("${ROPE_AOT_DIR}")
  add_custom_target(rope_aot_kernels)
else()
  # The Python that compiles the kernels needs Triton. Unless told one, it is the interpreter of
  # the environment this torch is installed in (torch's Linux wheels bring Triton along), as in
  # site-packages/torch -> lib/pythonX.Y -> lib -> bin/python3, else whichever CMake finds.
  if(NOT DEFINED Python3_EXECUTABLE)
    cmake_path(GET TORCH_INSTALL_PREFIX PARENT_PATH _rope_site_packages)
    cmake_path(GET _rope_site_packages PARENT_PATH _rope_lib_python)
    cmake_path(GET _rope_lib_python FILENAME _rope_python_name)
    cmake_path(GET _rope_lib_python PARENT_PATH _rope_lib)
    cmake_path(GET _rope_lib PARENT_PATH _rope_environment)
    foreach(_rope_candidate "${_rope_environment}/bin/${_rope_python_name}" "${_rope_environment}/bin/python3")
      if(EXISTS "${_rope_candidate}")
        set(Python3_EXECUTABLE "${_rope_candidate}" CACHE FILEPATH "Python that compiles the Triton kernels")
        break()
      endif()
    endforeach()
  endif()
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  execute_process(COMMAND "${Python3_EXECUTABLE}" -c "import triton; print(triton.__version__)"
                  RESULT_VARIABLE _rope_triton_missing OUTPUT_VARIABLE _rope_triton_version
                  ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_rope_triton_missing)
    message(FATAL_ERROR "rope_kernels: the CUDA path compiles its kernels with Triton, which "
                        "${Python3_EXECUTABLE} cannot import. Pass -DPython3_EXECUTABLE=<a Python with "
                        "triton>, or -DROPE_PREBUILT_KERNELS=<a kernel build>, or -DROPE_WITH_CUDA=OFF.")
  endif()
  message(STATUS "rope_kernels: kernels compiled by Triton ${_rope_triton_version} (${Python3_EXECUTABLE}), "
                 "cached in ${ROPE_AOT_CACHE_DIR}")
  set(ROPE_AOT_DIR "${CMAKE_CURRENT_BINARY_DIR}/aot")
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
    BYPRODUCTS "${ROPE_AOT_DIR}/rope_kernel_table.cpp" "${ROPE_AOT_DIR}/aot_manifest.json"
    COMMENT "Compiling the Triton kernels ahead of time (sm ${_rope_archs})"
    USES_TERMINAL
    VERBATIM)
endif()

set(ROPE_AOT_TABLE_SOURCE "${ROPE_AOT_DIR}/rope_kernel_table.cpp")
# The table pulls each arch's cubins in with `.incbin "cubins_sm<arch>.bin"`, a name the assembler
# looks up in its include directories: a kernel build stays valid when its directory moves.
set_source_files_properties("${ROPE_AOT_TABLE_SOURCE}" PROPERTIES COMPILE_OPTIONS "-Wa,-I${ROPE_AOT_DIR}")
