"""Compile one variant of rope_qk_kernel for one architecture, with no GPU and no driver.

Runs inside the build's worker processes. ``triton.compile(ASTSource(...), target=GPUTarget(...))``
is used directly rather than ``triton.tools.compile``: the tool asks the active driver for a
target and for C type names, which fails on a machine without a GPU.

Each result is stored in the build cache as ``<key>.cubin`` plus ``<key>.json`` (the metadata the
launcher needs), and for the arch whose PTX the build embeds, ``<key>.ptx``; so a warm build never
starts Triton at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import os
import re
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from . import aot_specs
from .aot_specs import Variant

# Bump when the cached record format or the way a variant is compiled changes.
CACHE_FORMAT = 3
# Triton appends one pointer parameter per scratch kind its metadata declares (3.6 to 3.9:
# global and profile scratch, so two). The launcher passes them as null, which is only right
# while their sizes are 0.
_SCRATCH_FIELDS = ("global_scratch_size", "profile_scratch_size")

# The environment Triton reads that changes the code it generates, beyond its version and the
# arch: part of our cache key so that a changed setting recompiles.
_CODEGEN_ENV = ("TRITON_DEFAULT_FP_FUSION", "TRITON_OVERRIDE_ARCH", "TRITON_PTXAS_PATH",
                "TRITON_PTXAS_BLACKWELL_PATH", "TRITON_LIBDEVICE_PATH", "DISABLE_PTXAS_OPT",
                "PTXAS_OPTIONS", "DISABLE_LLVM_OPT")


@dataclasses.dataclass(frozen=True)
class CompileJob:
    arch: int
    variant: Variant
    kernel_path: str  # rope_kernel.py
    cubin_path: str  # where the cubin goes in the cache; metadata next to it as .json
    keep_ptx: bool = False  # store the PTX too (as .ptx next to the cubin)


@dataclasses.dataclass(frozen=True)
class CompiledVariant:
    """What the launcher needs about one cubin (the json record of the cache)."""

    arch: int
    name: str
    num_warps: int
    shared: int
    num_trailing_null_params: int
    block_h: int
    stride_bits: int
    cubin_size: int
    cubin_path: str
    ptx_path: str = ""  # the PTX text, where the job kept it


@dataclasses.dataclass(frozen=True)
class JobResult:
    job: CompileJob
    compiled: CompiledVariant | None  # None when it failed
    error: str = ""  # the failure, as text: Triton's exceptions do not always pickle


def cache_key(kernel_source: str, triton_version: str, arch: int, variant: Variant) -> str:
    """Hash of everything that determines the cubin."""
    spec = {
        "format": CACHE_FORMAT,
        "triton": triton_version,
        "arch": arch,
        "signature": variant.signature(),
        "constexprs": variant.constexprs(arch),
        "divisible_by_16": variant.divisible_by_16(),
        "num_warps": variant.launch(arch).num_warps,
        "env": {name: os.environ.get(name) for name in _CODEGEN_ENV},
    }
    h = hashlib.sha256(kernel_source.encode())
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()


def load_cached(cubin_path: Path, want_ptx: bool = False) -> CompiledVariant | None:
    """The cached record of a cubin (and its PTX, if wanted), or None if absent or incomplete."""
    meta_path = cubin_path.with_suffix(".json")
    try:
        record = json.loads(meta_path.read_text())
        compiled = CompiledVariant(**record)
    except (OSError, ValueError, TypeError):
        return None
    if not cubin_path.is_file() or cubin_path.stat().st_size != compiled.cubin_size:
        return None
    ptx_path = cubin_path.with_suffix(".ptx")
    if want_ptx and not ptx_path.is_file():
        return None
    return dataclasses.replace(compiled, cubin_path=str(cubin_path), ptx_path=str(ptx_path) if want_ptx else "")


def compile_job(job: CompileJob) -> JobResult:
    """Worker entry point: compile, check, store in the cache. Never raises."""
    try:
        # On a ptxas failure Triton prints the whole PTX to stdout (hundreds of lines per job);
        # the exception already says what failed, so keep the build log readable.
        with contextlib.redirect_stdout(io.StringIO()):
            return JobResult(job, _compile_and_store(job))
    except Exception as e:  # noqa: BLE001 - reported to the driver, which decides what fails
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return JobResult(job, None, detail or type(e).__name__)


def _compile_and_store(job: CompileJob) -> CompiledVariant:
    kernel = _compile(job)
    md = kernel.metadata
    _check_no_scratch(md)
    expected_trailing = sum(1 for field in _SCRATCH_FIELDS if hasattr(md, field))
    trailing = count_trailing_params(kernel.asm["ptx"], md.name, job.variant.param_bits(), expected_trailing)
    cubin: bytes = kernel.asm["cubin"]
    compiled = CompiledVariant(
        arch=job.arch,
        name=md.name,
        num_warps=md.num_warps,
        shared=md.shared,
        num_trailing_null_params=trailing,
        block_h=job.variant.launch(job.arch).block_h,
        stride_bits=job.variant.stride_bits,
        cubin_size=len(cubin),
        cubin_path=job.cubin_path,
    )
    if job.keep_ptx:
        # Written before the record, which marks the entry complete. NUL-terminated: the driver
        # takes PTX as a C string.
        ptx_path = Path(job.cubin_path).with_suffix(".ptx")
        ptx_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(ptx_path, kernel.asm["ptx"].encode() + b"\0")
        compiled = dataclasses.replace(compiled, ptx_path=str(ptx_path))
    _store(Path(job.cubin_path), cubin, compiled)
    return compiled


def _compile(job: CompileJob) -> Any:
    # Imported here: the driver process only needs Triton's version, never its compiler.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _load_kernel_module(job.kernel_path)
    fn = getattr(module, aot_specs.KERNEL_NAME)
    _check_parameter_list(list(fn.arg_names))
    _check_grid_orders(module)
    variant = job.variant
    src = ASTSource(fn=fn, signature=variant.signature(), constexprs=variant.constexprs(job.arch),
                    attrs=_divisibility_attrs(fn.arg_names, variant.divisible_by_16()))
    return triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                          options={"num_warps": variant.launch(job.arch).num_warps})


@functools.cache
def _load_kernel_module(path: str) -> ModuleType:
    """The package's rope_kernel module (imported once per worker), which must be the file the
    job names: that file's text is what the cache key hashes."""
    module = importlib.import_module(f"{__package__}.rope_kernel")
    if Path(module.__file__ or "").resolve() != Path(path).resolve():
        raise RuntimeError(f"kernels.rope_kernel is {module.__file__}, not the file being compiled, {path}")
    return module


def _check_parameter_list(arg_names: list[str]) -> None:
    """The launcher passes parameters by position: the kernel must have exactly the agreed list."""
    expected = list(aot_specs.RUNTIME_PARAMS + aot_specs.CONSTEXPR_PARAMS)
    if arg_names != expected:
        raise RuntimeError(f"{aot_specs.KERNEL_NAME} parameters changed: {arg_names} != {expected}")


def _check_grid_orders(module: ModuleType) -> None:
    """The launcher sends grid_order and pos_kind as aot_specs.GRID_ORDERS and POS_KINDS number
    them: the kernel's constants must agree."""
    for prefix, names in (("GRID_", aot_specs.GRID_ORDERS), ("POS_", aot_specs.POS_KINDS)):
        for value, name in enumerate(names):
            constant = getattr(module, prefix + name.upper(), None)
            if getattr(constant, "value", constant) != value:
                raise RuntimeError(f"rope_kernel.{prefix}{name.upper()} is {constant}, aot_specs says {value}")


def _divisibility_attrs(arg_names: list[str], hinted: tuple[str, ...]) -> dict[tuple[int, ...], Any]:
    """Hints in the ASTSource attrs format of Triton 3.3 and later (3.6, 3.8 and 3.9 agree):
    {(param_index,): [["tt.divisibility", 16]]}."""
    return {(arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}


def _check_no_scratch(md: Any) -> None:
    """The launcher passes the trailing scratch pointers as null: refuse a kernel that uses them."""
    for field in _SCRATCH_FIELDS:
        # Absent in old releases; None in 3.6 when the module has no such attribute.
        size = getattr(md, field, 0) or 0
        if size > 0:
            raise RuntimeError(f"{md.name} needs {field}={size} bytes: the launcher has no scratch buffer")


_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)")
_PARAM_RE = re.compile(r"\.param\s+\.([a-z]+)(\d+)\b")


def ptx_entry_param_bits(ptx: str, name: str) -> list[int]:
    """Register width of each parameter of the PTX entry `name`, in order."""
    for match in _ENTRY_RE.finditer(ptx):
        if match.group(1) == name:
            return [int(bits) for _, bits in _PARAM_RE.findall(match.group(2))]
    raise RuntimeError(f"no .entry {name} in the PTX")


def count_trailing_params(ptx: str, name: str, expected_bits: list[int], expected: int) -> int:
    """Number of parameters Triton appended after our 31 (PTX params - 31), checking that ours
    have the widths the launcher passes (`expected_bits`, from the variant) and that the rest are
    the `expected` scratch pointers."""
    bits = ptx_entry_param_bits(ptx, name)
    ours = bits[:len(expected_bits)]
    trailing = bits[len(expected_bits):]
    if ours != expected_bits:
        raise RuntimeError(f"{name}: PTX parameter widths {ours} != expected {expected_bits}")
    if len(trailing) != expected or any(b != 64 for b in trailing):
        raise RuntimeError(f"{name}: {len(bits)} PTX parameters; expected {len(ours)} + {expected} "
                           f"scratch pointers, found trailing widths {trailing}")
    return len(trailing)


def _store(cubin_path: Path, cubin: bytes, compiled: CompiledVariant) -> None:
    """Write the cubin, then its record: a record only exists for a complete cubin."""
    cubin_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(cubin_path, cubin)
    record = dataclasses.asdict(compiled)
    _atomic_write(cubin_path.with_suffix(".json"), json.dumps(record, indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    # Renamed into place so that a build interrupted mid-write never leaves a torn cache entry.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
