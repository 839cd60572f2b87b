"""Checks what the wheel and the sdist hold, and the wheel's metadata, against the source tree.

    python .ci/check_distributions.py --wheel W.whl [--sdist S.tar.gz] [--same-files-as OTHER.whl]
                                      [--torch-series 2.13] [--manylinux]

Run from the repository root. The torch series the wheel must require is --torch-series, else
that of this Python's torch. --manylinux: the wheel is a release wheel, repaired by auditwheel
(.ci/release_wheels.py) to a manylinux tag. Needs readelf (binutils) and, for --sdist, git.
Exits 1 with one line per problem.
"""
from __future__ import annotations

import argparse
import email.parser
import json
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "rope_kernels"
DISTRIBUTION = "rope-kernels"
# The wheel's tag: any CPython from 3.10 on (the library uses no Python C API), this platform.
PYTHON_TAG, ABI_TAG = "cp310", "abi3"
REQUIRES_PYTHON = ">=3.10"
LICENSE = "BSD-3-Clause"
# The libraries the op library may load: torch's own (c10 and torch_cpu; the OpenMP runtime that
# torch ships and loads), which the wheel leaves to the torch it requires, and those of the system
# that every manylinux policy allows. Nothing else: not libcuda (opened at run time), not
# libpython (C++ programs use the library too), not libtorch_cuda (so that the CPU build of torch
# serves too).
TORCH_LIBRARIES = ("libtorch_cpu.so", "libc10.so", "libgomp.so.1")
SYSTEM_LIBRARIES = ("libstdc++.so.6", "libgcc_s.so.1", "libm.so.6", "libc.so.6", "libdl.so.2", "libpthread.so.0",
                    "librt.so.1", "ld-linux-x86-64.so.2")
MANYLINUX_TAG = re.compile(r"manylinux_2_(\d+)_" + re.escape(platform.machine()))
# What a build needs besides the tracked files under these folders.
SDIST_TOP_FILES = ["CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"]
SDIST_FOLDERS = ["cmake", "csrc", "kernels", "python", "tests"]


def this_torch_series() -> str:
    import torch

    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def tracked_files(folders: list[str]) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", *folders], check=True, capture_output=True, text=True).stdout
    return out.split()


def check_wheel(path: Path, version: str, series: str, manylinux: bool) -> list[str]:
    problems: list[str] = []
    prefix = f"{PACKAGE}-{version}-{PYTHON_TAG}-{ABI_TAG}-"
    platform_tag = path.name[len(prefix):-len(".whl")] if path.name.startswith(prefix) else ""
    if manylinux and not MANYLINUX_TAG.fullmatch(platform_tag):
        problems.append(f"wheel is named {path.name}, expected {prefix}manylinux_2_<glibc minor>_{platform.machine()}.whl")
    if not manylinux and platform_tag != f"linux_{platform.machine()}":
        problems.append(f"wheel is named {path.name}, expected {prefix}linux_{platform.machine()}.whl")
    dist_info = f"{PACKAGE}-{version}.dist-info"
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        wheel_info = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/WHEEL").decode())
        built_with = json.loads(wheel.read(f"{PACKAGE}/_built_with.json")) if f"{PACKAGE}/_built_with.json" in names else {}

    sources = sorted(p.name for p in Path("python", PACKAGE).iterdir() if p.suffix == ".py")
    required = [f"{PACKAGE}/{n}" for n in sources + ["VERSION", "py.typed", "_built_with.json"]]
    required.append(f"{dist_info}/licenses/LICENSE")
    problems += [f"wheel lacks {n}" for n in required if n not in names]
    libraries = [n for n in names if n.startswith(f"{PACKAGE}/_ops") and n.endswith(".so")]
    if libraries != [f"{PACKAGE}/_ops.{ABI_TAG}.so"]:
        problems.append(f"wheel holds op libraries {libraries}, expected one {PACKAGE}/_ops.{ABI_TAG}.so")
    stray = sorted(n for n in names if not n.startswith((f"{PACKAGE}/", f"{dist_info}/")))
    problems += [f"wheel holds {n}, outside the package" for n in stray]

    expected_fields = {
        "Name": DISTRIBUTION, "Version": version, "Requires-Python": REQUIRES_PYTHON,
        "License-Expression": LICENSE, "Description-Content-Type": "text/markdown",
    }
    for field, value in expected_fields.items():
        if metadata.get(field) != value:
            problems.append(f"METADATA {field}: {metadata.get(field)!r}, expected {value!r}")
    requires = metadata.get_all("Requires-Dist") or []
    if requires != [f"torch=={series}.*"]:
        problems.append(f"METADATA Requires-Dist: {requires}, expected ['torch=={series}.*'] (torch only)")
    if "LICENSE" not in (metadata.get_all("License-File") or []):
        problems.append("METADATA names no License-File LICENSE")
    readme = Path("README.md").read_text()
    if metadata.get_payload().strip() != readme.strip():
        problems.append("METADATA description is not README.md")
    if wheel_info.get("Root-Is-Purelib") != "false":
        problems.append("WHEEL says Root-Is-Purelib is not false: the op library is platform specific")
    if ".".join(built_with.get("torch", "").split("+")[0].split(".")[:2]) != series:
        problems.append(f"_built_with.json {built_with}, expected a torch {series} build")
    return problems


def check_dynamic_section(path: Path) -> list[str]:
    """The op library opens libcuda itself (so it imports without a driver), never loads libpython
    (C++ programs use it too), and carries no library search path of the machine that built it."""
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as scratch:
        member = f"{PACKAGE}/_ops.{ABI_TAG}.so"
        if member not in wheel.namelist():
            return []  # reported by check_wheel
        library = wheel.extract(member, scratch)
        dynamic = subprocess.run(["readelf", "-d", library], check=True, capture_output=True, text=True).stdout
    entries = [line.strip() for line in dynamic.splitlines() if re.search(r"\((NEEDED|RPATH|RUNPATH)\)", line)]
    print("\n".join(["op library dynamic section:"] + [f"  {e}" for e in entries]))
    problems = [f"op library has {e}: it finds torch's libraries through the loaded torch"
                for e in entries if re.search(r"\((RPATH|RUNPATH)\)", e)]
    needed = [m.group(1) for e in entries if (m := re.search(r"\(NEEDED\).*\[(.+)\]", e))]
    problems += [f"op library loads {name}, which is neither torch's nor the system's" for name in needed
                 if name not in TORCH_LIBRARIES + SYSTEM_LIBRARIES]
    for name in ("libstdc++.so.6", "libc10.so", "libtorch_cpu.so"):
        if name not in needed:
            problems.append(f"op library does not load {name} (the shared one torch uses)")
    return problems


def check_sdist(path: Path, version: str) -> list[str]:
    root = f"{DISTRIBUTION.replace('-', '_')}-{version}"
    with tarfile.open(path) as sdist:
        names = {n[len(root) + 1:] for n in sdist.getnames() if n.startswith(root + "/")}
    required = SDIST_TOP_FILES + tracked_files(SDIST_FOLDERS)
    problems = [f"sdist lacks {n}" for n in required if n not in names]
    leftovers = sorted(n for n in names if n.endswith(".so") or n.endswith("_built_with.json")
                       or n.startswith("build/") or "__pycache__" in n)
    problems += [f"sdist holds build output {n}" for n in leftovers]
    return problems


def file_list(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as wheel:
        return {n for n in wheel.namelist() if ".dist-info/" not in n or n.endswith(("METADATA", "WHEEL"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--sdist", type=Path)
    parser.add_argument("--same-files-as", type=Path, help="another wheel that must hold the same files")
    parser.add_argument("--torch-series", help="the torch series the wheel requires (default: this Python's)")
    parser.add_argument("--manylinux", action="store_true", help="a release wheel, with a manylinux tag")
    args = parser.parse_args()
    version = Path("python", PACKAGE, "VERSION").read_text().strip()
    series = args.torch_series or this_torch_series()
    problems = check_wheel(args.wheel, version, series, args.manylinux) + check_dynamic_section(args.wheel)
    if args.sdist:
        problems += check_sdist(args.sdist, version)
    if args.same_files_as:
        ours, theirs = file_list(args.wheel), file_list(args.same_files_as)
        problems += [f"only in {args.wheel.name}: {n}" for n in sorted(ours - theirs)]
        problems += [f"only in {args.same_files_as}: {n}" for n in sorted(theirs - ours)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    checked = [str(p) for p in (args.wheel, args.sdist, args.same_files_as) if p]
    print(f"{'FAILED' if problems else 'ok'}: {', '.join(checked)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
