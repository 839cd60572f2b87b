# The installed C++ package: a C++ project writes
#   find_package(RopeKernels REQUIRED)
#   target_link_libraries(app PRIVATE RopeKernels::rope_kernels)
# and its program can call rope_kernels::fused_qk (rope_kernels/rope_kernels.h) or load TorchScript
# and AOTInductor models that use the rope ops.
include(CMakePackageConfigHelpers)

# Linking must be enough to register the ops. The ops are registered by static objects of the
# library when it loads, and callers reach them by name through the dispatcher, so no caller refers
# to a symbol of the library: a linker running with --as-needed (the default of several Linux
# distributions) would leave it out of the program, and the ops would be missing at run time.
# RopeKernels::rope_kernels names the library once more behind --no-as-needed, as torch's own
# CMake targets do for libtorch_cpu and libtorch_cuda; one comma-joined item keeps the three linker
# arguments together and in order on the link line. ($<TARGET_NAME:...> makes the exported copy
# name the imported target, RopeKernels::rope_kernels_ops.)
add_library(rope_kernels INTERFACE)
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  target_link_libraries(rope_kernels INTERFACE
      "-Wl,--no-as-needed,$<TARGET_FILE:$<TARGET_NAME:rope_kernels_ops>>,--as-needed")
endif()
target_link_libraries(rope_kernels INTERFACE rope_kernels_ops)
# The same name for projects that build this one inside their own (add_subdirectory).
add_library(RopeKernels::rope_kernels ALIAS rope_kernels)

# Installed, the library finds the libtorch it was built against, and nothing else by RPATH
# (torch's link directories include a few of its build machine's that mean nothing here).
# setup.py skips RPATHs altogether: in the wheel the library finds torch's libraries through the
# torch Python package, which is loaded first.
if(NOT DEFINED CMAKE_INSTALL_RPATH)
  set_target_properties(rope_kernels_ops PROPERTIES INSTALL_RPATH "${TORCH_INSTALL_PREFIX}/lib")
endif()

set(ROPE_CMAKE_PACKAGE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/RopeKernels")
install(TARGETS rope_kernels_ops rope_kernels EXPORT RopeKernelsTargets
        LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}")
install(DIRECTORY csrc/include/rope_kernels DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(EXPORT RopeKernelsTargets NAMESPACE RopeKernels:: DESTINATION "${ROPE_CMAKE_PACKAGE_DIR}")

configure_package_config_file(cmake/RopeKernelsConfig.cmake.in
    "${CMAKE_CURRENT_BINARY_DIR}/RopeKernelsConfig.cmake"
    INSTALL_DESTINATION "${ROPE_CMAKE_PACKAGE_DIR}")
# torch's C++ ABI changes between minor releases, and so does ours with it.
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/RopeKernelsConfigVersion.cmake"
    VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/RopeKernelsConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/RopeKernelsConfigVersion.cmake"
              "${CMAKE_CURRENT_SOURCE_DIR}/cmake/torch_cuda_setup.cmake"
        DESTINATION "${ROPE_CMAKE_PACKAGE_DIR}")
