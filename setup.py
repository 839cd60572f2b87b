"""Builds the rope_kernels wheel by driving CMakeLists.txt, the one build that C++ users share.

The op library is a plain shared library (no Python module init, no libpython): it is declared
as a py_limited_api extension only so that setuptools names it, places it in the package (also
for editable installs) and tags the wheel as platform-specific but Python-version independent.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = (ROOT / "python" / "rope_kernels" / "VERSION").read_text().strip()


class CMakeLibrary(Extension):
    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[], py_limited_api=True)
        self.target = target


def torch_build_requirement() -> str:
    """The torch series the library is built for: its C++ ABI changes between minor releases.

    `==2.14.*` matches every 2.14 release, whatever its local label (+cu130, +cpu), and nothing else.
    """
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def build_tool(name: str) -> str:
    """The cmake or ninja that the build requirements install (the Python packages of those names),
    else the one on PATH.

    The packages' own binaries rather than PATH's: PATH changes with venv activation, and a build
    tree configured by one cmake and then run by another regenerates and recompiles everything.
    """
    try:
        if name == "cmake":
            import cmake

            found = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        else:
            import ninja

            found = Path(ninja.BIN_DIR) / "ninja"
        if found.is_file():
            return str(found)
    except ImportError:
        pass
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"rope_kernels: the build needs {name}: pip install {name} (requirements-dev.txt has it)")
    return on_path


def check_shared_cxx_runtime(library: Path) -> None:
    """Refuse a library that carries its own copy of the C++ runtime.

    Some toolchains link libstdc++ statically by default. The op library then holds a second
    libstdc++ next to the one torch uses, and an error message that formats a number crashes the
    process (the two runtimes disagree on iostream locale facets).
    """
    readelf = shutil.which("readelf")
    if readelf is None:
        return
    dynamic = subprocess.run([readelf, "-d", str(library)], check=True, capture_output=True, text=True).stdout
    if "libstdc++" not in dynamic:
        compiler = os.environ.get("CXX", "the default C++ compiler")
        raise RuntimeError(
            f"rope_kernels: {library.name} was linked with a static C++ runtime by {compiler}; "
            "torch needs the shared libstdc++. Build with a compiler that links it dynamically, "
            "e.g. CXX=/usr/bin/g++ (and remove build/cmake to reconfigure)."
        )


class BuildWithCMake(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeLibrary):
            return super().build_extension(ext)
        import torch

        # A fixed build tree (not setuptools' temporary one) so that a rebuild redoes only what
        # changed, AOT kernels included.
        build_dir = Path(os.environ.get("ROPE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = build_tool("cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={build_tool('ninja')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ROPE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            # The library finds torch's libraries through the already-loaded torch; a build-tree
            # RPATH would leak this machine's paths into the wheel.
            "-DCMAKE_SKIP_RPATH=ON",
        ]
        # The build follows the environment of this call, not of the one before: an option that is
        # not set now is dropped from the CMake cache, so that CMakeLists.txt's default applies again.
        for option in ("ROPE_WITH_CUDA", "ROPE_CUDA_ARCHS", "ROPE_AOT_JOBS", "ROPE_AOT_CACHE_DIR",
                       "ROPE_PREBUILT_KERNELS"):
            if option in os.environ:
                configure.append(f"-D{option}={os.environ[option]}")
            else:
                configure.append(f"-U{option}")
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)

        built = build_dir / f"lib{ext.target}.so"
        check_shared_cxx_runtime(built)
        destination = Path(self.get_ext_fullpath(ext.name))
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Into place by rename: a process that has the old library loaded keeps its (unlinked)
        # file, where overwriting it in place would change the code under it.
        staging = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(built, staging)
        os.replace(staging, destination)
        # Read at import, before the library is loaded, to explain a torch mismatch in words
        # instead of an undefined-symbol error.
        built_with = {"torch": torch.__version__, "cuda": torch.version.cuda}
        (destination.parent / "_built_with.json").write_text(json.dumps(built_with) + "\n")

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy only the library into the source tree; the build record goes along.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            record = Path(regular_file).parent / "_built_with.json"
            if record.exists():
                shutil.copyfile(record, Path(inplace_file).parent / record.name)


setup(
    version=VERSION,
    install_requires=[torch_build_requirement()],
    ext_modules=[CMakeLibrary("rope_kernels._ops", target="rope_kernels_ops")],
    cmdclass={"build_ext": BuildWithCMake},
    # The library uses no Python C API at all, so one wheel serves every CPython that the
    # required torch supports (3.10 and later for the torch releases this builds against).
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
