"""The kernel build step (kernels/build_aot.py, kernels/*.cmake) as its user meets it: a progress
count during a build of minutes, and a kernel build made once and reused by another build tree
(ROPE_PREBUILT_KERNELS) only when it comes from the same kernel sources."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rope_env import HAS_SOURCE_TREE, REPO_ROOT

if not HAS_SOURCE_TREE:
    pytest.skip("kernels/ is the build's source: not beside this copy of the tests", allow_module_level=True)

from kernels import build_aot  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_captured_log_reaches_the_terminal_every_interval() -> None:
    log, terminal, clock = io.StringIO(), io.StringIO(), FakeClock()
    progress = build_aot.Progress(10, stream=log, terminal=terminal, clock=clock)
    progress.announce("[aot] start")
    for done in range(1, 11):
        clock.now = done * progress.INTERVAL_S / 2  # a kernel every half interval
        progress.add(cached=done <= 2)
    progress.finish()
    expected = ["[aot] start"] + [f"[aot] {n}/10 compiled (2 from cache)" for n in (2, 4, 6, 8, 10)]
    expected.append("[aot] 10/10 compiled (2 from cache)")
    assert log.getvalue().splitlines() == expected
    # The same lines, after one newline that leaves the line of pip's spinner.
    assert terminal.getvalue() == "\n" + log.getvalue()


def test_progress_on_a_terminal_rewrites_one_line_and_leaves_the_other_terminal_alone() -> None:
    screen, other = Terminal(), io.StringIO()
    progress = build_aot.Progress(3, stream=screen, terminal=other)
    for _ in range(3):
        progress.add()
    progress.finish()
    assert screen.getvalue() == "".join(f"\r[aot] {n}/3 compiled (0 from cache)" for n in (1, 2, 3)) + \
        "\r[aot] 3/3 compiled (0 from cache)\n"
    assert other.getvalue() == ""


def _cmake() -> str:
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            pytest.skip("no cmake")
        return found


def _fake_kernel_build(directory: Path, digests: dict[str, str]) -> Path:
    """A kernel build directory as build_aot writes it, with the given source digests."""
    directory.mkdir()
    (directory / "rope_kernel_table.cpp").write_text("// stands in for the generated table\n")
    manifest = {"triton_version": "0.0", "architectures": [90], "inputs_sha256": digests}
    (directory / "aot_manifest.json").write_text(json.dumps(manifest))
    return directory


def _configure(tmp_path: Path, kernels: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_cmake(), "-S", REPO_ROOT, "-B", str(tmp_path / "build"), "-DROPE_WITH_CUDA=ON",
         f"-DROPE_PREBUILT_KERNELS={kernels}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, timeout=600)


def _digests() -> dict[str, str]:
    return {name: hashlib.sha256((Path(REPO_ROOT) / name).read_bytes()).hexdigest() for name in build_aot.BUILD_INPUTS}


def test_a_kernel_build_of_these_sources_is_taken_without_triton(tmp_path: Path) -> None:
    kernels = _fake_kernel_build(tmp_path / "kernels", _digests())
    proc = _configure(tmp_path, kernels)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"rope_kernels: kernels from {kernels} (Triton 0.0, sm [ 90 ])" in proc.stdout, proc.stdout


@pytest.mark.parametrize("changed", ["kernels/rope_kernel.py", "csrc/cuda/kernel_table.h"])
def test_a_kernel_build_of_other_sources_is_refused(tmp_path: Path, changed: str) -> None:
    digests = _digests()
    digests[changed] = "0" * 64
    proc = _configure(tmp_path, _fake_kernel_build(tmp_path / "kernels", digests))
    assert proc.returncode != 0, proc.stdout
    message = " ".join(proc.stderr.split())  # CMake wraps long messages
    assert f"was made from another {changed} than this source tree's" in message, proc.stderr
