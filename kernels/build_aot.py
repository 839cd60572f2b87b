"""Ahead-of-time build of the RoPE kernels: Triton source -> cubins -> C++ sources for the launcher.

    python -m kernels.build_aot --out-dir DIR --cache-dir DIR [--archs 80,86,89,90,100,120] [--jobs N]

Compiles every variant of aot_specs for every architecture (no GPU or driver needed) and writes
rope_kernel_table.cpp, cubins_sm<arch>.bin and aot_manifest.json into --out-dir. Compiled cubins
are cached under --cache-dir, so an unchanged kernel rebuilds in well under a second.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from . import aot_emit
from . import aot_specs
from .aot_compile import (
    CompiledVariant,
    CompileJob,
    JobResult,
    cache_key,
    compile_job,
    load_cached,
)

KERNEL_FILE = Path(__file__).resolve().with_name("rope_kernel.py")
SOURCE_ROOT = KERNEL_FILE.parent.parent
# The files a kernel build depends on besides Triton, relative to the source root: the manifest
# records their digests, and a build tree that reuses a kernel build checks them against its own
# (kernels/prebuilt_kernels.cmake).
BUILD_INPUTS = ("kernels/rope_kernel.py", "kernels/aot_specs.py", "kernels/aot_compile.py",
                "kernels/aot_emit.py", "kernels/build_aot.py", "csrc/cuda/kernel_table.h")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="where the generated sources go")
    parser.add_argument("--cache-dir", type=Path, required=True, help="compiled cubins, kept between builds")
    parser.add_argument("--archs", type=_parse_archs, default=list(aot_specs.DEFAULT_ARCHS),
                        help="comma-separated compute capabilities (default: %(default)s); "
                             f"failures of archs other than {aot_specs.REQUIRED_ARCHS} skip the arch")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    return parser.parse_args(argv)


def _parse_archs(text: str) -> list[int]:
    try:
        archs = sorted({int(a) for a in text.split(",") if a.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 80,90, got {text!r}") from None
    if not archs:
        raise argparse.ArgumentTypeError("no architecture given")
    return archs


def setup_triton_env(cache_dir: Path) -> None:
    """Environment for Triton, set before any worker imports it (children inherit it)."""
    # Triton's own cache inside ours, not in the user's home: the build stays self-contained.
    os.environ["TRITON_CACHE_DIR"] = str((cache_dir / "triton").resolve())
    # Fusion on, as in every Triton so far; set explicitly because 3.9 warns when it is unset
    # and announced a change of default. An explicit user setting wins (and is in the cache key).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def triton_version() -> str:
    import triton  # only its version: compilation happens in the workers
    return str(triton.__version__)


class Progress:
    """The count of kernels compiled, for a build that takes minutes.

    On a terminal, one line rewritten in place. Otherwise (a build log) a line every 30 seconds
    and at the end, written to the log and, where the build was started from a terminal that
    does not see the log (pip captures a build's output unless run with -v), to that terminal too.
    """

    INTERVAL_S = 30.0

    def __init__(self, total: int, stream: TextIO = sys.stdout, terminal: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.cached = 0
        self.stream = stream
        self.live = stream.isatty()
        self.terminal = None if self.live else terminal
        self.terminal_used = False
        self.clock = clock
        self.last_line_at = clock()

    def announce(self, text: str) -> None:
        """A line for everyone watching: the log and the terminal."""
        for out in self._outputs():
            if out is self.terminal and not self.terminal_used:
                out.write("\n")  # off the line of pip's spinner
                self.terminal_used = True
            out.write(text + "\n")
            out.flush()

    def add(self, cached: bool = False) -> None:
        self.done += 1
        self.cached += int(cached)
        if self.live:
            self.stream.write(f"\r{self._line()}")
            self.stream.flush()
        elif self.clock() - self.last_line_at >= self.INTERVAL_S:
            self.last_line_at = self.clock()
            self.announce(self._line())

    def finish(self) -> None:
        if self.live:
            self.stream.write(f"\r{self._line()}\n")
            self.stream.flush()
        else:
            self.announce(self._line())

    def _outputs(self) -> list[TextIO]:
        return [self.stream] + ([self.terminal] if self.terminal is not None else [])

    def _line(self) -> str:
        return f"[aot] {self.done}/{self.total} compiled ({self.cached} from cache)"


def build_terminal() -> TextIO | None:
    """The terminal the build runs under, or None where there is none (CI, a detached job)."""
    try:
        return open("/dev/tty", "w")  # noqa: SIM115 - kept open for the build's lifetime
    except OSError:
        return None


def summarize_error(error: str) -> str:
    """One stable line of a compile error: ptxas's own complaint when there is one.

    The full text names temporary files, which would make the manifest differ on every run."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    fatal = [line for line in lines if "fatal" in line.lower()]
    return " ".join((fatal or lines or ["unknown error"])[0].split())


def plan_jobs(archs: list[int], cache_dir: Path, version: str, source: str) -> list[CompileJob]:
    """One job per (arch, built variant), in table order; the PTX arch's keep their PTX."""
    jobs = []
    ptx_arch = aot_specs.ptx_arch(archs)
    for arch in archs:
        for variant in aot_specs.built_variants():
            key = cache_key(source, version, arch, variant)
            cubin = cache_dir / "cubins" / key[:2] / f"{key}.cubin"
            jobs.append(CompileJob(arch, variant, str(KERNEL_FILE), str(cubin.resolve()), keep_ptx=arch == ptx_arch))
    return jobs


def run_jobs(jobs: list[CompileJob], n_jobs: int, progress: Progress) -> Iterable[JobResult]:
    """Results of cache hits first, then of the compiled jobs as they finish."""
    misses = []
    for job in jobs:
        cached = load_cached(Path(job.cubin_path), want_ptx=job.keep_ptx)
        if cached is None:
            misses.append(job)
        else:
            progress.add(cached=True)
            yield JobResult(job, cached)
    if misses:
        yield from _compile_misses(misses, n_jobs, progress)


def _probe_first(jobs: list[CompileJob]) -> list[CompileJob]:
    """Each arch's first job ahead of the rest: an arch Triton cannot compile shows up at once."""
    firsts: dict[int, CompileJob] = {}
    for job in jobs:
        firsts.setdefault(job.arch, job)
    probes = list(firsts.values())
    return probes + [j for j in jobs if j not in probes]


def _compile_misses(jobs: list[CompileJob], n_jobs: int, progress: Progress) -> Iterable[JobResult]:
    # Each job is a whole Triton pipeline (about a second): processes, one job per task.
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(n_jobs, len(jobs)))) as pool:
        pending = {pool.submit(compile_job, job): job for job in _probe_first(jobs)}
        dropped: set[int] = set()
        for future in concurrent.futures.as_completed(list(pending)):
            if future.cancelled():
                continue
            result = future.result()
            progress.add()
            yield result
            arch = result.job.arch
            if result.compiled is None and arch not in dropped:
                # An optional arch will be skipped and a required one fails the build: either
                # way, do not spend minutes compiling what will be thrown away.
                dropped.add(arch)
                every_arch = not aot_specs.is_optional_arch(arch)
                progress.total -= _cancel(pending, arch, every_arch)


def _cancel(pending: dict[concurrent.futures.Future[JobResult], CompileJob], arch: int, every_arch: bool) -> int:
    """Cancel the jobs not yet started of `arch` (or of all archs); return how many were cancelled now."""
    return sum(1 for f, job in pending.items()
               if (every_arch or job.arch == arch) and not f.cancelled() and f.cancel())


def collect(results: Iterable[JobResult]) -> tuple[dict[int, dict[int, CompiledVariant]], dict[int, str]]:
    """Group results per arch; an arch with any failure is returned with its first error."""
    kernels: dict[int, dict[int, CompiledVariant]] = {}
    errors: dict[int, str] = {}
    for r in results:
        if r.compiled is None:
            errors.setdefault(r.job.arch, f"{r.job.variant.label()}: {r.error}")
        else:
            kernels.setdefault(r.job.arch, {})[r.job.variant.index] = r.compiled
    for arch in errors:
        kernels.pop(arch, None)
    return kernels, errors


def build(out_dir: Path, cache_dir: Path, archs: list[int], n_jobs: int, terminal: TextIO | None = None) -> None:
    setup_triton_env(cache_dir)
    version = triton_version()
    source = KERNEL_FILE.read_text()
    jobs = plan_jobs(archs, cache_dir, version, source)
    start = time.monotonic()
    progress = Progress(len(jobs), terminal=terminal)
    progress.announce(f"[aot] triton {version}: {len(jobs)} kernels "
                      f"({len(jobs) // len(archs)} variants x sm_{', sm_'.join(map(str, archs))}), {n_jobs} jobs")
    kernels, errors = collect(run_jobs(jobs, n_jobs, progress))
    progress.finish()
    fatal = {a: e for a, e in errors.items() if not aot_specs.is_optional_arch(a)}
    skipped = {a: summarize_error(e) for a, e in errors.items() if a not in fatal}
    for arch, reason in sorted(skipped.items()):
        progress.announce(f"[aot] note: skipping sm_{arch}: Triton {version} cannot compile it: {reason}")
    if fatal:
        details = "\n".join(f"  sm_{a}: {e}" for a, e in sorted(fatal.items()))
        raise SystemExit(f"[aot] error: compilation failed for required architectures:\n{details}")
    if not kernels:
        raise SystemExit("[aot] error: no architecture could be compiled")
    inputs = {name: hashlib.sha256((SOURCE_ROOT / name).read_bytes()).hexdigest() for name in BUILD_INPUTS}
    changed = aot_emit.write_outputs(out_dir, version, inputs, kernels, skipped)
    progress.announce(f"[aot] sm_{', sm_'.join(map(str, sorted(kernels)))} in {time.monotonic() - start:.1f} s; "
                      f"{len(changed)} file(s) updated in {out_dir}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    terminal = build_terminal()
    try:
        build(args.out_dir, args.cache_dir, args.archs, max(1, args.jobs), terminal)
    finally:
        if terminal is not None:
            terminal.close()


if __name__ == "__main__":
    main()
