# What torch's CMake config (find_package(Torch)) of a CUDA build needs from its caller to
# configure on a machine without a GPU, set only where the caller has not set it. Included before
# find_package(Torch) by this project and by the installed RopeKernelsConfig.cmake, so that a
# program built against the package needs no such flags either.

# Torch's config probes the GPU to choose nvcc flags unless told an architecture list, and the
# probe fails without a GPU. Nothing of ours is compiled by nvcc.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()

# The CUDA toolkit root. Torch's config looks for it (FindCUDA: CUDA_TOOLKIT_ROOT_DIR; ours and
# newer torch: CUDAToolkit_ROOT) only at the directory above `nvcc` on PATH, which is wrong where
# that nvcc is a wrapper script outside the toolkit and misses a toolkit not on PATH. The first
# candidate holding cuda.h wins: CUDA_HOME, CUDA_PATH, the real location of the nvcc on PATH,
# /usr/local/cuda.
function(_rope_find_cuda_toolkit_root out)
  set(candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}")
  find_program(_rope_nvcc nvcc NO_CACHE)
  if(_rope_nvcc)
    file(REAL_PATH "${_rope_nvcc}" nvcc_file)
    cmake_path(GET nvcc_file PARENT_PATH nvcc_bin)
    cmake_path(GET nvcc_bin PARENT_PATH nvcc_root)
    list(APPEND candidates "${nvcc_root}")
  endif()
  list(APPEND candidates "/usr/local/cuda")
  foreach(root IN LISTS candidates)
    if(root AND EXISTS "${root}/include/cuda.h")
      set(${out} "${root}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out} "" PARENT_SCOPE)
endfunction()

if(NOT CUDA_TOOLKIT_ROOT_DIR AND NOT CUDAToolkit_ROOT)
  _rope_find_cuda_toolkit_root(_rope_cuda_root)
  if(_rope_cuda_root)
    set(CUDAToolkit_ROOT "${_rope_cuda_root}" CACHE PATH "CUDA toolkit root (found by rope_kernels)")
    set(CUDA_TOOLKIT_ROOT_DIR "${_rope_cuda_root}" CACHE PATH "CUDA toolkit root (found by rope_kernels)")
  endif()
elseif(NOT CUDA_TOOLKIT_ROOT_DIR)
  set(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_ROOT}" CACHE PATH "CUDA toolkit root")
elseif(NOT CUDAToolkit_ROOT)
  set(CUDAToolkit_ROOT "${CUDA_TOOLKIT_ROOT_DIR}" CACHE PATH "CUDA toolkit root")
endif()
