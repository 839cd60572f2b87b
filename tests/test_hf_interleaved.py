"""rope_kernels' drop-ins for transformers' interleaved RoPE functions: DeepSeek-V3's
``apply_rotary_pos_emb_interleave`` (pairs (2i, 2i+1) in, half-split out) and GLM's
``apply_rotary_pos_emb`` (interleaved pairs over a partial width), as ``apply_rotary_pos_emb_glm``.

Each is checked against a float64 reference written here from the functions' semantics (each pair
a complex number, multiplied by its angle's), and, where transformers is importable, against
transformers' own functions and tiny models that call them.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, List, Optional, Tuple

import pytest
import torch
from torch._dynamo.utils import counters

import rope_kernels
from rope_env import DEVICES, device_dtype_params, requires_cuda
from rope_kernels import _limits
from rope_kernels.testing import assert_output_layout, tolerance

Rope = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def transformers_function(module: str, name: str) -> Optional[Rope]:
    """transformers' own function, taken before any test can replace it; None without transformers."""
    try:
        return getattr(importlib.import_module("transformers.models." + module), name)  # type: ignore[no-any-return]
    except ImportError:
        return None


THEIRS = {
    "deepseek_v3": transformers_function("deepseek_v3.modeling_deepseek_v3", "apply_rotary_pos_emb_interleave"),
    "glm": transformers_function("glm.modeling_glm", "apply_rotary_pos_emb"),
    "glm4": transformers_function("glm4.modeling_glm4", "apply_rotary_pos_emb"),
}
requires_transformers = pytest.mark.skipif(THEIRS["glm"] is None, reason="needs transformers")

BATCH, HEADS_Q, HEADS_K, SEQ, MAX_SEQ = 3, 4, 2, 9, 64
NOPE = 24  # DeepSeek's features without rotation, before the rotary ones in each head

# ----------------------------------------------------------------------------------------------
# The float64 reference


def _as_pairs(x64: torch.Tensor) -> torch.Tensor:
    """Features (2i, 2i+1) of float64 x as complex number i."""
    return torch.view_as_complex(x64.reshape(*x64.shape[:-1], x64.shape[-1] // 2, 2).contiguous())


def reference_deepseek(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3: pair i, x[2i] + j x[2i+1], times c_i + j s_i; the real parts form the first
    half of the result and the imaginary parts the second. c/s float64, one column per pair,
    broadcastable to x's pairs. Differentiable in x, c and s."""
    rotated = _as_pairs(x.double()) * torch.complex(c, s)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def reference_glm(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """GLM: the first 2 * c.shape[-1] features as pairs (2i, 2i+1), pair i times c_i + j s_i,
    written back as (real, imaginary) at (2i, 2i+1); the features after them unchanged."""
    x64 = x.double()
    width = 2 * c.shape[-1]
    rotated = _as_pairs(x64[..., :width]) * torch.complex(c, s)
    return torch.cat([torch.view_as_real(rotated).flatten(-2), x64[..., width:]], dim=-1)


def pair_angles(cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin of each pair's angle, float64 on the CPU: the first half of the full-width
    tables (an odd width W has W // 2 pairs), with a dimension for the heads."""
    pairs = cos.shape[-1] // 2
    c = cos.detach().cpu().double()[..., :pairs].unsqueeze(unsqueeze_dim)
    s = sin.detach().cpu().double()[..., :pairs].unsqueeze(unsqueeze_dim)
    return c, s


FUNCTIONS = {
    "deepseek_v3": (rope_kernels.apply_rotary_pos_emb_interleave, reference_deepseek),
    "glm": (rope_kernels.apply_rotary_pos_emb_glm, reference_glm),
}

# ----------------------------------------------------------------------------------------------
# Inputs


def rope_tables(form: str, device: str, dtype: torch.dtype, width: int, batch: int = BATCH,
                seq: int = SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as transformers' rotary embeddings pass them: (batch, seq, width) per token, the
    angles of random positions twice (cat(freqs, freqs)), in `dtype`."""
    positions = torch.stack([torch.randperm(MAX_SEQ)[:seq] for _ in range(batch)]).double()
    inv_freq = 10000.0 ** (-torch.arange(0, width - width % 2, 2, dtype=torch.float64) / width)
    freqs = positions[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    if width % 2:  # an odd width: one column more, never read
        angles = torch.cat([angles, torch.rand(batch, seq, 1, dtype=torch.float64)], dim=-1)
    cos, sin = angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)
    if form == "per_batch":  # every sequence at its own positions
        return cos, sin
    if form == "shared":  # (1, seq, width): the same positions for every sequence
        return cos[:1], sin[:1]
    if form == "expanded":  # (batch, seq, width) with batch stride 0
        return cos[:1].expand(batch, -1, -1), sin[:1].expand(batch, -1, -1)
    if form == "transposed":  # (batch, seq, width) seen through a (seq, batch, width) buffer
        return (cos.transpose(0, 1).contiguous().transpose(0, 1), sin.transpose(0, 1).contiguous().transpose(0, 1))
    raise ValueError(form)


FORMS = ["per_batch", "shared", "expanded", "transposed"]


def heads(device: str, dtype: torch.dtype, count: int, head_dim: int, heads_first: bool, offset: int = 0,
          seq: int = SEQ) -> torch.Tensor:
    """q or k as attention code makes them: the last head_dim features of the heads of a
    (batch, seq, heads, offset + head_dim) projection (a view starting `offset` features in, with
    gaps when offset > 0), as (batch, heads, seq, head_dim) when heads_first. Made on the device
    itself: copying a view with gaps to another device would make it contiguous."""
    projection = torch.randn(BATCH, seq, count, offset + head_dim, device=device).to(dtype)
    x = projection[..., offset:]
    return x.transpose(1, 2) if heads_first else x


def deepseek_qk(device: str, dtype: torch.dtype, rope_dim: int, heads_first: bool = True,
                seq: int = SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q_rot and k_rot as DeepSeek-V3's attention passes them: the rotary slice of each query
    head, after NOPE features, and the one shared key head, a slice of the compressed projection."""
    q = heads(device, dtype, HEADS_Q, rope_dim, heads_first, offset=NOPE, seq=seq)
    compressed = torch.randn(BATCH, seq, 32 + rope_dim, device=device).to(dtype)
    k = compressed[..., 32:].unsqueeze(1 if heads_first else 2)
    return q, k


def glm_qk(device: str, dtype: torch.dtype, head_dim: int, heads_first: bool = True,
           seq: int = SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q and k as GLM's attention passes them: transposed (batch, seq, heads, dim) projections,
    k a slice of a wider one."""
    return (heads(device, dtype, HEADS_Q, head_dim, heads_first, seq=seq),
            heads(device, dtype, HEADS_K, head_dim, heads_first, offset=head_dim, seq=seq))


def make_qk(name: str, device: str, dtype: torch.dtype, head_dim: int, heads_first: bool = True,
            seq: int = SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    if name == "deepseek_v3":
        return deepseek_qk(device, dtype, head_dim, heads_first, seq)
    return glm_qk(device, dtype, head_dim, heads_first, seq)


# (function, head_dim, rotated width): DeepSeek rotates its whole rotary slice; GLM the first
# half of each head (its partial rotary factor), or all of it.
CASES = [
    pytest.param("deepseek_v3", 64, 64, id="deepseek_v3-64"),
    pytest.param("deepseek_v3", 32, 32, id="deepseek_v3-32"),
    pytest.param("glm", 128, 64, id="glm-half-128"),
    pytest.param("glm", 32, 16, id="glm-half-32"),
    pytest.param("glm", 64, 64, id="glm-full-64"),
]

# ----------------------------------------------------------------------------------------------
# Comparisons


def assert_like_transformers(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor) -> None:
    """Same dtype and shape as transformers' result, and close to it: float32 to a few ulps; in
    16-bit transformers rounds each product before the sum, so where the products nearly cancel
    its result is off by a few roundings of x's magnitude, not of the result's."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if ours.dtype == torch.float32 or ours.dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    else:
        unit = 2.0**-8 if ours.dtype == torch.bfloat16 else 2.0**-11
        torch.testing.assert_close(ours, theirs, rtol=2 * unit, atol=3 * unit * float(x.abs().max()))


def assert_rounded_once(ours: torch.Tensor, expected64: torch.Tensor) -> None:
    """Within one rounding of ours' dtype of the float64 truth."""
    torch.testing.assert_close(ours.detach().cpu().double(), expected64.detach(), **tolerance(ours.dtype))


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a call dispatches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------
# Results


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32", "fp64")))
def test_same_results_as_the_formula(device: str, dtype: torch.dtype, name: str, head_dim: int, width: int,
                                     form: str) -> None:
    ours_fn, reference = FUNCTIONS[name]
    cos, sin = rope_tables(form, device, dtype, width)
    q, k = make_qk(name, device, dtype, head_dim)
    ours = ours_fn(q, k, cos, sin)
    c, s = pair_angles(cos, sin)
    theirs_fn = THEIRS[name]
    for x, got in zip((q, k), ours):
        assert got.dtype == dtype and got.shape == x.shape and got.device == x.device
        assert_rounded_once(got, reference(x.cpu(), c, s))
        assert_output_layout(got, x)  # laid out like x, as the attention kernel downstream expects
    if theirs_fn is not None:
        for x, got, want in zip((q, k), ours, theirs_fn(q, k, cos, sin)):
            assert_like_transformers(got, want, x)


@requires_transformers
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_glm4_is_glm(device: str, dtype: torch.dtype) -> None:
    # GLM-4's function is GLM's: the same drop-in serves both.
    glm4 = THEIRS["glm4"]
    if glm4 is None:
        pytest.skip("this transformers has no GLM-4")
    cos, sin = rope_tables("per_batch", device, dtype, 64)
    q, k = glm_qk(device, dtype, 128)
    for x, got, want in zip((q, k), rope_kernels.apply_rotary_pos_emb_glm(q, k, cos, sin), glm4(q, k, cos, sin)):
        assert_like_transformers(got, want, x)


@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_heads_last_layout(device: str, dtype: torch.dtype, name: str, head_dim: int, width: int) -> None:
    # unsqueeze_dim=2: q and k (batch, seq, heads, dim), not transposed, as the op's "bshd" layout.
    ours_fn, reference = FUNCTIONS[name]
    cos, sin = rope_tables("per_batch", device, dtype, width)
    q, k = make_qk(name, device, dtype, head_dim, heads_first=False)
    ours = ours_fn(q, k, cos, sin, None, 2)
    c, s = pair_angles(cos, sin, unsqueeze_dim=2)
    for x, got in zip((q, k), ours):
        assert got.dtype == dtype and got.shape == x.shape
        assert_rounded_once(got, reference(x.cpu(), c, s))
        assert_output_layout(got, x)
    theirs_fn = THEIRS[name]
    if theirs_fn is not None:
        for x, got, want in zip((q, k), ours, theirs_fn(q, k, cos, sin, unsqueeze_dim=2)):
            assert_like_transformers(got, want, x)


@pytest.mark.parametrize("seq", [SEQ, 1], ids=["prefill", "decode_step"])
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_position_ids_are_ignored(device: str, name: str, head_dim: int, width: int, seq: int) -> None:
    # transformers' functions take position_ids and ignore them: the angles are already per token.
    ours_fn, _ = FUNCTIONS[name]
    cos, sin = rope_tables("per_batch", device, torch.float32, width, seq=seq)
    q, k = make_qk(name, device, torch.float32, head_dim, seq=seq)
    position_ids = torch.randint(0, MAX_SEQ, (BATCH, seq), device=device)
    for got, want in zip(ours_fn(q, k, cos, sin, position_ids), ours_fn(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("q_dtype", "table_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                      (torch.float16, torch.bfloat16)],
                         ids=["bf16-fp32", "fp32-bf16", "fp16-bf16"])
@pytest.mark.parametrize("name", ["deepseek_v3", "glm"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_as_transformers(device: str, name: str, q_dtype: torch.dtype,
                                              table_dtype: torch.dtype) -> None:
    # q * cos promotes: bfloat16 q with float32 cos gives float32 results in transformers, so here too.
    ours_fn, reference = FUNCTIONS[name]
    head_dim, width = (64, 64) if name == "deepseek_v3" else (64, 32)
    cos, sin = rope_tables("per_batch", device, table_dtype, width)
    q, k = make_qk(name, device, q_dtype, head_dim)
    expected_dtype = torch.promote_types(q_dtype, table_dtype)
    c, s = pair_angles(cos, sin)
    ours = ours_fn(q, k, cos, sin)
    for x, got in zip((q, k), ours):
        assert got.dtype == expected_dtype
        assert_rounded_once(got, reference(x.cpu(), c, s))
    theirs_fn = THEIRS[name]
    if theirs_fn is not None:
        for x, got, want in zip((q, k), ours, theirs_fn(q, k, cos, sin)):
            assert_like_transformers(got, want, x)


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("heads_first", [True, False], ids=["bhsd", "bshd"])
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_gradients(device: str, dtype: torch.dtype, name: str, head_dim: int, width: int, heads_first: bool) -> None:
    ours_fn, reference = FUNCTIONS[name]
    cos, sin = rope_tables("per_batch", device, dtype, width)
    q0, k0 = make_qk(name, device, dtype, head_dim, heads_first)
    unsqueeze_dim = 1 if heads_first else 2
    weights = [torch.randn(x.shape, dtype=dtype).to(device) for x in (q0, k0)]
    q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
    outs = ours_fn(q, k, cos, sin, None, unsqueeze_dim)
    sum((out * w).sum() for out, w in zip(outs, weights)).backward()

    # The float64 gradient of the reference: the inverse rotation of the incoming gradient.
    c, s = pair_angles(cos, sin, unsqueeze_dim)
    for x, grad, weight in zip((q0, k0), (q.grad, k.grad), weights):
        x64 = x.detach().cpu().double().requires_grad_()
        (reference(x64, c, s) * weight.cpu().double()).sum().backward()
        assert grad is not None and grad.dtype == dtype and grad.shape == x.shape
        assert_rounded_once(grad, x64.grad)

    theirs_fn = THEIRS[name]
    if theirs_fn is not None:
        qt, kt = q0.detach().requires_grad_(), k0.detach().requires_grad_()
        outs = theirs_fn(qt, kt, cos, sin, unsqueeze_dim=unsqueeze_dim)
        sum((out * w).sum() for out, w in zip(outs, weights)).backward()
        for ours_grad, their_grad, weight in zip((q.grad, k.grad), (qt.grad, kt.grad), weights):
            assert_like_transformers(ours_grad, their_grad, weight)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm"])
def test_tables_that_require_grad_get_their_gradients(name: str) -> None:
    # The op treats cos/sin as constants; a caller differentiating them gets the formula's gradients.
    ours_fn, reference = FUNCTIONS[name]
    cos, sin = rope_tables("per_batch", "cpu", torch.float64, 32)
    q, k = make_qk(name, "cpu", torch.float64, 32 if name == "deepseek_v3" else 64)
    c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    q_out, k_out = ours_fn(q, k, c, s)
    (q_out.sum() + (k_out * 2).sum()).backward()
    # The reference's gradients, through the first half of the tables that it reads.
    c64, s64 = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    half = cos.shape[-1] // 2
    angles = (c64[..., :half].unsqueeze(1), s64[..., :half].unsqueeze(1))
    (reference(q, *angles).sum() + (reference(k, *angles) * 2).sum()).backward()
    torch.testing.assert_close(c.grad, c64.grad)
    torch.testing.assert_close(s.grad, s64.grad)


# ----------------------------------------------------------------------------------------------
# The op serves what transformers passes; the formula everything else


@pytest.mark.parametrize("heads_first", [True, False], ids=["bhsd", "bshd"])
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_one_fused_call(device: str, name: str, head_dim: int, width: int, heads_first: bool) -> None:
    # One op call and nothing else: no transpose, no copy of the features passed through, no concatenation.
    ours_fn, _ = FUNCTIONS[name]
    q, k = make_qk(name, device, torch.bfloat16, head_dim, heads_first)
    for form in ("per_batch", "shared"):
        cos, sin = rope_tables(form, device, torch.bfloat16, width)
        with RecordOps() as record:
            ours_fn(q, k, cos, sin, None, 1 if heads_first else 2)
        assert record.ops == [torch.ops.rope.fused_qk.default], record.ops


@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_tables_unsqueezed_at_dim_0(device: str, name: str, head_dim: int, width: int) -> None:
    # (seq, width) tables with unsqueeze_dim=0 (Pixtral's call) against (batch, heads, seq, dim) q
    # and k: the one table of every sequence, in one op call, as the formula broadcasts it.
    ours_fn, reference = FUNCTIONS[name]
    q, k = make_qk(name, device, torch.float32, head_dim)
    cos, sin = (t[0] for t in rope_tables("shared", device, torch.float32, width))
    with RecordOps() as record:
        ours = ours_fn(q, k, cos, sin, None, 0)
    # The op once, and views of the tables (nothing copied).
    assert [op for op in record.ops if not op.is_view] == [torch.ops.rope.fused_qk.default], record.ops
    c, s = pair_angles(cos[None], sin[None])
    for x, got in zip((q, k), ours):
        assert got.shape == x.shape
        assert_rounded_once(got, reference(x.cpu(), c, s))


def fallback_cases(device: str) -> List[Tuple[str, str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(description, function, q, k, cos, sin, unsqueeze_dim) of inputs the op does not serve."""
    cases = []
    for name in ("deepseek_v3", "glm"):
        width = 32 if name == "deepseek_v3" else 16
        q, k = make_qk(name, device, torch.float32, 32)
        cos, sin = rope_tables("per_batch", device, torch.float32, width)
        # One angle row for every token: only broadcasting makes it fit.
        cases.append(("one row", name, q, k, cos[:, :1], sin[:, :1], 1))
        # q and k of different dtypes: the formula promotes each on its own.
        cases.append(("k in float64", name, q, k.double(), cos, sin, 1))
        if name == "deepseek_v3":  # (GLM's formula cannot concatenate such a key with its rest)
            # A key batch of 1 broadcast against the queries'.
            cases.append(("k batch 1", name, q, k[:1], cos, sin, 1))
        # 3-D q and k with a (seq, width) table, unsqueezed at 0.
        cases.append(("3-D", name, q[0], k[0], cos[0], sin[0], 0))
    q, k = glm_qk(device, torch.float32, 32)
    cos, sin = rope_tables("per_batch", device, torch.float32, 17)
    # An odd width: GLM rotates one feature fewer than the table's columns.
    cases.append(("odd width", "glm", q, k, cos, sin, 1))
    q, k = deepseek_qk(device, torch.float32, 32)
    cos, sin = rope_tables("per_batch", device, torch.float32, 2)
    # A DeepSeek table of one pair: broadcast over every pair of the head.
    cases.append(("one pair", "deepseek_v3", q, k, cos, sin, 1))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_other_inputs_fall_back_to_the_formula(device: str) -> None:
    for what, name, q, k, cos, sin, unsqueeze_dim in fallback_cases(device):
        ours_fn, reference = FUNCTIONS[name]
        with RecordOps() as record:
            ours = ours_fn(q, k, cos, sin, None, unsqueeze_dim)
        assert torch.ops.rope.fused_qk.default not in record.ops, what
        c, s = pair_angles(cos, sin, unsqueeze_dim)
        for x, got in zip((q, k), ours):
            expected = reference(x.cpu(), c, s)
            assert got.shape == expected.shape, what
            torch.testing.assert_close(got.cpu().double(), expected, **tolerance(got.dtype), msg=what)
        theirs_fn = THEIRS[name]
        if theirs_fn is not None:  # the same formula, the same operations: the same bits
            for got, want in zip(ours, theirs_fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=what)


@requires_cuda
@pytest.mark.parametrize("name", ["deepseek_v3", "glm"])
def test_cuda_head_dim_limit(name: str) -> None:
    # The largest head_dim of the CUDA kernels goes to the op; one pair more, to the formula.
    ours_fn, reference = FUNCTIONS[name]
    for head_dim, served in ((_limits.CUDA_MAX_HEAD_DIM, True), (_limits.CUDA_MAX_HEAD_DIM + 2, False)):
        width = head_dim if name == "deepseek_v3" else _limits.CUDA_MAX_HEAD_DIM // 2
        q, k = make_qk(name, "cuda", torch.float32, head_dim)
        cos, sin = rope_tables("per_batch", "cuda", torch.float32, width)
        with RecordOps() as record:
            ours = ours_fn(q, k, cos, sin)
        assert (torch.ops.rope.fused_qk.default in record.ops) == served, head_dim
        c, s = pair_angles(cos, sin)
        for x, got in zip((q, k), ours):
            assert_rounded_once(got, reference(x.cpu(), c, s))


# ----------------------------------------------------------------------------------------------
# torch.compile and TorchScript


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device: str, name: str, head_dim: int, width: int, dynamic: bool,
                                       fresh_dynamo: Any) -> None:
    ours_fn, _ = FUNCTIONS[name]
    compiled = torch.compile(ours_fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for seq in (SEQ, SEQ + 4):
        for form, heads_first in (("per_batch", True), ("shared", True), ("per_batch", False)):
            cos, sin = rope_tables(form, device, torch.float32, width, seq=seq)
            q, k = make_qk(name, device, torch.float32, head_dim, heads_first, seq=seq)
            unsqueeze_dim = 1 if heads_first else 2
            for got, want in zip(compiled(q, k, cos, sin, None, unsqueeze_dim),
                                 ours_fn(q, k, cos, sin, None, unsqueeze_dim)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(("name", "head_dim", "width"), CASES)
def test_torchscript(name: str, head_dim: int, width: int) -> None:
    ours_fn, _ = FUNCTIONS[name]
    scripted = torch.jit.script(ours_fn)
    cos, sin = rope_tables("per_batch", "cpu", torch.float32, width)
    for heads_first in (True, False):
        q, k = make_qk(name, "cpu", torch.float32, head_dim, heads_first)
        unsqueeze_dim = 1 if heads_first else 2
        for got, want in zip(scripted(q, k, cos, sin, None, unsqueeze_dim),
                             ours_fn(q, k, cos, sin, None, unsqueeze_dim)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Inside transformers' models

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    # (modeling module, the function its attention calls, config)
    "deepseek_v3": ("deepseek_v3.modeling_deepseek_v3", "apply_rotary_pos_emb_interleave",
                    dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                         qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                         topk_group=1, rope_interleave=True)),
    "glm": ("glm.modeling_glm", "apply_rotary_pos_emb", dict(num_key_value_heads=2, head_dim=32)),
    "glm4": ("glm4.modeling_glm4", "apply_rotary_pos_emb", dict(num_key_value_heads=2, head_dim=32)),
}
REPLACEMENTS = {"deepseek_v3": rope_kernels.apply_rotary_pos_emb_interleave,
                "glm": rope_kernels.apply_rotary_pos_emb_glm, "glm4": rope_kernels.apply_rotary_pos_emb_glm}
MODEL_DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=requires_cuda),
]


@requires_transformers
@pytest.mark.parametrize(("device", "dtype"), MODEL_DEVICE_DTYPES)
@pytest.mark.parametrize("family", list(MODELS))
def test_in_a_model(family: str, device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny random model gives the same logits and parameter gradients with its RoPE function
    # replaced by the drop-in, which the model then really calls.
    from transformers import AutoConfig, AutoModelForCausalLM

    if THEIRS[family] is None:
        pytest.skip("this transformers has no " + family)
    module_name, function, extra = MODELS[family]
    module = importlib.import_module("transformers.models." + module_name)
    config = AutoConfig.for_model(family, **TINY, **extra)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device=device, dtype=dtype)
    ids = torch.randint(3, TINY["vocab_size"], (2, 12)).to(device)

    def logits_and_grads() -> Tuple[torch.Tensor, List[torch.Tensor]]:
        model.zero_grad()
        logits = model(ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    theirs, their_grads = logits_and_grads()
    calls = []
    replacement = REPLACEMENTS[family]

    def counted(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return replacement(*args, **kwargs)

    monkeypatch.setattr(module, function, counted)
    with RecordOps() as record:
        ours, our_grads = logits_and_grads()
    assert len(calls) == TINY["num_hidden_layers"]
    assert record.ops.count(torch.ops.rope.fused_qk.default) == TINY["num_hidden_layers"]
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
    assert len(our_grads) == len(their_grads)
    for got, want in zip(our_grads, their_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # The rotation matters to these logits: without it they differ (so the comparison says something).
    monkeypatch.setattr(module, function, lambda q, k, *args, **kwargs: (q, k))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, theirs, rtol=1e-3, atol=1e-3 * scale)
