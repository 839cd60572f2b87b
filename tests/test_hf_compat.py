"""rope_kernels.apply_rotary_pos_emb against transformers' own function, for every form of cos/sin
transformers 4.x and 5.x pass, and against a float64 reference."""
from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

import rope_kernels
from rope_env import DEVICES, device_dtype_params, requires_cuda
from rope_kernels import _limits
from rope_kernels.testing import assert_output_layout, tolerance

# transformers' functions, taken before any test can patch the modules.
TRANSFORMERS_APPLY = modeling_llama.apply_rotary_pos_emb
TRANSFORMERS_APPLY_PARTIAL = modeling_phi3.apply_rotary_pos_emb

BATCH, HEADS_Q, HEADS_K, SEQ, HEAD_DIM = 3, 8, 2, 11, 32
MAX_SEQ = 40


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a call dispatches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def rotary_embedding(device: str, dtype: torch.dtype, rotary_dim: int = HEAD_DIM) -> Any:
    """transformers' own Llama rotary embedding, which makes the cos/sin its models pass."""
    config = modeling_llama.LlamaConfig(hidden_size=HEADS_Q * HEAD_DIM, num_attention_heads=HEADS_Q,
                                        head_dim=rotary_dim, max_position_embeddings=MAX_SEQ)
    return modeling_llama.LlamaRotaryEmbedding(config).to(device), torch.zeros((), dtype=dtype, device=device)


def per_token_tables(form: str, device: str, dtype: torch.dtype, rotary_dim: int = HEAD_DIM,
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(cos, sin, position_ids to pass, the (batch, seq) positions each token really has)."""
    rotary, like = rotary_embedding(device, dtype, rotary_dim)
    positions = torch.stack([torch.randperm(MAX_SEQ)[:SEQ] for _ in range(BATCH)]).to(device)
    if form == "per_batch":  # transformers >= 4.38: gathered per token, every sequence its own positions
        cos, sin = rotary(like, positions)
        return cos, sin, None, positions
    if form == "shared":  # (1, seq, dim): the same positions for every sequence
        cos, sin = rotary(like, positions[:1])
        return cos, sin, None, positions[:1].expand(BATCH, SEQ)
    if form == "expanded":  # (batch, seq, dim) with batch stride 0
        cos, sin = rotary(like, positions[:1])
        return cos.expand(BATCH, -1, -1), sin.expand(BATCH, -1, -1), None, positions[:1].expand(BATCH, SEQ)
    if form == "transposed":  # (batch, seq, dim) seen through a (seq, batch, dim) buffer
        cos, sin = rotary(like, positions)
        return (cos.transpose(0, 1).contiguous().transpose(0, 1), sin.transpose(0, 1).contiguous().transpose(0, 1),
                None, positions)
    if form == "ignored_position_ids":  # 4.38-4.5x passed position_ids along, unused
        cos, sin = rotary(like, positions)
        return cos, sin, torch.zeros_like(positions), positions
    table_cos, table_sin = rotary(like, torch.arange(MAX_SEQ, device=device)[None])  # (1, max_seq, dim)
    if form == "table_2d":  # transformers 4.36-4.37: (max_seq, dim) and position_ids
        return table_cos[0], table_sin[0], positions, positions
    if form == "table_4d":  # transformers 4.31-4.35: (1, 1, max_seq, dim) and position_ids
        return table_cos[None], table_sin[None], positions, positions
    if form == "table_1s_positions":  # position_ids (1, seq) shared by the batch
        return table_cos[0], table_sin[0], positions[:1], positions[:1].expand(BATCH, SEQ)
    raise ValueError(form)


FORMS = ["per_batch", "shared", "expanded", "transposed", "ignored_position_ids", "table_2d", "table_4d",
         "table_1s_positions"]


def q_and_k(device: str, dtype: torch.dtype, heads_second: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the attention makes them: transposed views of (batch, seq, heads, dim) projections."""
    q = torch.randn(BATCH, SEQ, HEADS_Q, HEAD_DIM, dtype=dtype).to(device)
    k = torch.randn(BATCH, SEQ, HEADS_K, HEAD_DIM, dtype=dtype).to(device)
    return (q.transpose(1, 2), k.transpose(1, 2)) if heads_second else (q, k)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, token_positions: torch.Tensor,
              per_token: bool) -> torch.Tensor:
    """float64 RoPE of x (B, H, S, D) with the angles of cos/sin, each token at its position;
    cos/sin width below D rotates only that many leading features."""
    width = cos.shape[-1]
    half = width // 2
    cos64, sin64 = cos.detach().cpu().double(), sin.detach().cpu().double()
    rows = token_positions.cpu()
    if per_token:  # (B or 1, S, width) already per token
        c, s = cos64.expand(x.shape[0], -1, -1)[:, None, :, :half], sin64.expand(x.shape[0], -1, -1)[:, None, :, :half]
    else:  # a table, gathered
        table_c, table_s = cos64.reshape(-1, width), sin64.reshape(-1, width)
        c, s = table_c[rows][:, None, :, :half], table_s[rows][:, None, :, :half]
    x64 = x.detach().cpu().double()
    x1, x2, rest = x64[..., :half], x64[..., half:width], x64[..., width:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def assert_like_transformers(ours: torch.Tensor, theirs: torch.Tensor, expected64: torch.Tensor,
                             x: torch.Tensor) -> None:
    """Same dtype and shape as transformers' result, within one rounding of the float64 truth (ours
    rounds once) and close to transformers' result. In 16-bit dtypes transformers rounds each
    product before the sum, so where x1*cos and x2*sin nearly cancel its result is off by a few
    roundings of the products, i.e. of x's magnitude, not of the result's."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.cpu().double(), expected64, **tolerance(ours.dtype))
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    else:
        unit = 2.0**-8 if ours.dtype == torch.bfloat16 else 2.0**-11
        torch.testing.assert_close(ours, theirs, rtol=2 * unit, atol=3 * unit * float(x.abs().max()))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_same_results_as_transformers(device: str, dtype: torch.dtype, form: str) -> None:
    cos, sin, position_ids, token_positions = per_token_tables(form, device, dtype)
    q, k = q_and_k(device, dtype)
    ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    if position_ids is not None and cos.dim() != 3:  # the 4.3x functions gathered the table rows
        theirs = TRANSFORMERS_APPLY(q, k, cos.reshape(MAX_SEQ, -1)[position_ids], sin.reshape(MAX_SEQ, -1)[position_ids])
    else:
        theirs = TRANSFORMERS_APPLY(q, k, cos, sin)
    per_token = cos.dim() == 3
    for x, got, want in zip((q, k), ours, theirs):
        assert_like_transformers(got, want, reference(x, cos, sin, token_positions, per_token), x)


@pytest.mark.parametrize(("q_dtype", "table_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                      (torch.float16, torch.bfloat16)], ids=["bf16-fp32", "fp32-bf16", "fp16-bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_as_transformers(device: str, q_dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    # q * cos promotes: bfloat16 q with float32 cos gives float32 results in transformers, so here too.
    cos, sin, _, token_positions = per_token_tables("per_batch", device, table_dtype)
    q, k = q_and_k(device, q_dtype)
    ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
    theirs = TRANSFORMERS_APPLY(q, k, cos, sin)
    for x, got, want in zip((q, k), ours, theirs):
        assert_like_transformers(got, want, reference(x, cos, sin, token_positions, True), x)


@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_heads_last_layout(device: str, dtype: torch.dtype) -> None:
    # unsqueeze_dim=2: q and k (batch, seq, heads, dim), as some attention kernels want them.
    cos, sin, _, token_positions = per_token_tables("per_batch", device, dtype)
    q, k = q_and_k(device, dtype, heads_second=False)
    ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    theirs = TRANSFORMERS_APPLY(q, k, cos, sin, unsqueeze_dim=2)
    for x, got, want in zip((q, k), ours, theirs):
        expected = reference(x.transpose(1, 2), cos, sin, token_positions, True).transpose(1, 2)
        assert_like_transformers(got, want, expected, x)


@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_tables_unsqueezed_at_dim_0_as_pixtral(device: str, dtype: torch.dtype) -> None:
    # Pixtral's call: (seq, dim) tables with unsqueeze_dim=0 broadcast against (batch, heads, seq,
    # dim) q and k, token s at row s for every sequence: one op call, forward and backward.
    rotary, like = rotary_embedding(device, dtype)
    positions = torch.randperm(MAX_SEQ)[:SEQ].to(device)
    cos, sin = (t[0] for t in rotary(like, positions[None]))
    q, k = (t.requires_grad_() for t in q_and_k(device, dtype))
    with RecordOps() as record:
        ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    # The op once, and views of the tables (nothing copied).
    assert [op for op in record.ops if not op.is_view] == [torch.ops.rope.fused_qk.default], record.ops
    theirs = TRANSFORMERS_APPLY(q, k, cos, sin, unsqueeze_dim=0)
    for x, got, want in zip((q, k), ours, theirs):
        assert_like_transformers(got, want, reference(x.detach(), cos, sin, positions.expand(BATCH, SEQ), True), x)
    # The gradient of the rotation by an angle is the rotation of the weights by its negative.
    weights = [torch.randn_like(t) for t in ours]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ours, weights)), (q, k))
    for got, w in zip(grads, weights):
        expected = reference(w, cos, -sin, positions.expand(BATCH, SEQ), True)
        torch.testing.assert_close(got.cpu().double(), expected, **tolerance(dtype))


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM // 2, 3 * HEAD_DIM // 4], ids=["half", "three_quarters"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_partial_rotary_as_phi3(device: str, dtype: torch.dtype, rotary_dim: int) -> None:
    # cos/sin narrower than head_dim rotate only the first rotary_dim features (Phi-3's partial
    # rotary factor); rotary_dim == head_dim / 2 must not be mistaken for a half-width table.
    cos, sin, _, token_positions = per_token_tables("per_batch", device, dtype, rotary_dim=rotary_dim)
    q, k = q_and_k(device, dtype)
    ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
    theirs = TRANSFORMERS_APPLY_PARTIAL(q, k, cos, sin)
    for x, got, want in zip((q, k), ours, theirs):
        assert_like_transformers(got, want, reference(x, cos, sin, token_positions, True), x)


def wide_heads(device: str, dtype: torch.dtype, head_dim: int, heads_first: bool,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of `head_dim` features as views of (batch, seq, heads, dim) projections: transposed
    when heads_first, and k a slice of a wider projection (gaps between its heads). Made on the
    device itself, so that the views keep their strides."""
    q = torch.randn(BATCH, SEQ, HEADS_Q, head_dim, device=device).to(dtype)
    k = torch.randn(BATCH, SEQ, HEADS_K, 2 * head_dim, device=device).to(dtype)[..., head_dim:]
    return (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)


def reference_any_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, token_positions: torch.Tensor,
                         heads_first: bool) -> torch.Tensor:
    """`reference` of per-token angles for x (B, H, S, D) or, heads last, (B, S, H, D)."""
    if heads_first:
        return reference(x, cos, sin, token_positions, True)
    return reference(x.transpose(1, 2), cos, sin, token_positions, True).transpose(1, 2)


# Phi-3-like partial rotary at a real head size: 96 of 128 features rotated, or half of them.
PARTIAL_WIDTHS = [pytest.param(128, 96, id="96_of_128"), pytest.param(128, 64, id="64_of_128")]


@pytest.mark.parametrize("heads_first", [True, False], ids=["bhsd", "bshd"])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), PARTIAL_WIDTHS)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_partial_rotary_in_one_pass(device: str, dtype: torch.dtype, head_dim: int, rotary_dim: int,
                                    heads_first: bool) -> None:
    # The op rotates the first rotary_dim features and copies the rest in the same call: one
    # fused_qk and nothing else (no slice rotated apart, no concatenation, no transpose).
    cos, sin, _, token_positions = per_token_tables("per_batch", device, dtype, rotary_dim=rotary_dim)
    q, k = wide_heads(device, dtype, head_dim, heads_first)
    unsqueeze_dim = 1 if heads_first else 2
    with RecordOps() as record:
        ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert record.ops == [torch.ops.rope.fused_qk.default], record.ops
    theirs = TRANSFORMERS_APPLY_PARTIAL(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for x, got, want in zip((q, k), ours, theirs):
        expected = reference_any_layout(x, cos, sin, token_positions, heads_first)
        assert_like_transformers(got, want, expected, x)
        assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # the rest exactly as it was
        assert_output_layout(got, x)


@pytest.mark.parametrize("heads_first", [True, False], ids=["bhsd", "bshd"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_partial_rotary_gradients(device: str, dtype: torch.dtype, heads_first: bool) -> None:
    # 96 of 128 features: the gradient is the inverse rotation of the incoming one over the
    # rotated features, and the incoming one itself over the rest.
    cos, sin, _, token_positions = per_token_tables("per_batch", device, dtype, rotary_dim=96)
    q0, k0 = wide_heads(device, dtype, 128, heads_first)
    unsqueeze_dim = 1 if heads_first else 2
    weights = [torch.randn(x.shape, dtype=dtype).to(device) for x in (q0, k0)]
    grads = []
    for apply in (rope_kernels.apply_rotary_pos_emb, TRANSFORMERS_APPLY_PARTIAL):
        q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
        outs = apply(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        sum((out * w).sum() for out, w in zip(outs, weights)).backward()
        grads.append((q.grad, k.grad))
    for x, ours, theirs, weight in zip((q0, k0), *grads, weights):
        # A rotation's transpose is its inverse: the incoming gradient rotated by minus the angles.
        expected = reference_any_layout(weight, cos, -sin, token_positions, heads_first)
        assert ours.dtype == dtype and ours.shape == x.shape
        torch.testing.assert_close(ours.cpu().double(), expected, **tolerance(dtype))
        assert torch.equal(ours[..., 96:], weight[..., 96:])
        if dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
        else:
            torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=3 * 2**-8 * float(weight.abs().max()))


@requires_cuda
def test_cuda_head_dim_limit() -> None:
    # The whole head goes to the op, so its head_dim (not the rotated width) meets the CUDA
    # kernels' limit: the largest is served, one pair more is computed by the formula.
    cos, sin, _, token_positions = per_token_tables("per_batch", "cuda", torch.float32, rotary_dim=64)
    for head_dim, served in ((_limits.CUDA_MAX_HEAD_DIM, True), (_limits.CUDA_MAX_HEAD_DIM + 2, False)):
        q, k = wide_heads("cuda", torch.float32, head_dim, True)
        with RecordOps() as record:
            ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
        assert (torch.ops.rope.fused_qk.default in record.ops) == served, head_dim
        for x, got, want in zip((q, k), ours, TRANSFORMERS_APPLY_PARTIAL(q, k, cos, sin)):
            assert_like_transformers(got, want, reference(x, cos, sin, token_positions, True), x)


def test_odd_head_dim_falls_back_to_the_formula() -> None:
    # The op rotates heads of an even size; an odd head with an even rotated width is the formula's.
    cos, sin, _, _ = per_token_tables("per_batch", "cpu", torch.float32, rotary_dim=16)
    q = torch.randn(BATCH, HEADS_Q, SEQ, 33)
    k = torch.randn(BATCH, HEADS_K, SEQ, 33)
    with RecordOps() as record:
        ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.ops.rope.fused_qk.default not in record.ops
    for got, want in zip(ours, TRANSFORMERS_APPLY_PARTIAL(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["per_batch", "shared", "table_2d"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_gradients_as_transformers(device: str, dtype: torch.dtype, form: str) -> None:
    cos, sin, position_ids, _ = per_token_tables(form, device, dtype)
    gathered = (cos.reshape(MAX_SEQ, -1)[position_ids], sin.reshape(MAX_SEQ, -1)[position_ids]) \
        if cos.dim() != 3 else (cos, sin)
    q0, k0 = q_and_k(device, dtype)
    weights = [torch.randn(x.shape, dtype=dtype).to(device) for x in (q0, k0)]
    grads = []
    for apply, tables, extra in ((rope_kernels.apply_rotary_pos_emb, (cos, sin), (position_ids,)),
                                 (TRANSFORMERS_APPLY, gathered, ())):
        q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
        outs = apply(q, k, *tables, *extra)
        sum((out * w).sum() for out, w in zip(outs, weights)).backward()
        grads.append((q.grad, k.grad))
    for ours, theirs, weight in zip(*grads, weights):
        if dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
        else:  # as for the forward: a few roundings of the incoming gradient's magnitude
            torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=3 * 2**-8 * float(weight.abs().max()))


def test_tables_that_require_grad_get_gradients_as_in_transformers() -> None:
    # The op treats cos/sin as constants; a caller differentiating them gets transformers' formula.
    cos, sin, _, _ = per_token_tables("per_batch", "cpu", torch.float32)
    q, k = q_and_k("cpu", torch.float32)
    table_grads = []
    for apply in (rope_kernels.apply_rotary_pos_emb, TRANSFORMERS_APPLY):
        c, s = cos.detach().requires_grad_(), sin.detach().requires_grad_()
        q_out, k_out = apply(q, k, c, s)
        (q_out.sum() + (k_out * 2).sum()).backward()
        table_grads.append((c.grad, s.grad))
    for ours, theirs in zip(*table_grads):
        torch.testing.assert_close(ours, theirs)


def test_unusual_inputs_fall_back_to_the_formula() -> None:
    # Shapes only broadcasting makes fit (one angle row for every token) are computed as transformers does.
    cos, sin, _, _ = per_token_tables("per_batch", "cpu", torch.float32)
    q, k = q_and_k("cpu", torch.float32)
    one_row_cos, one_row_sin = cos[:, :1], sin[:, :1]  # (batch, 1, dim)
    ours = rope_kernels.apply_rotary_pos_emb(q, k, one_row_cos, one_row_sin)
    theirs = TRANSFORMERS_APPLY(q, k, one_row_cos, one_row_sin)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want)
    # A key batch of 1, broadcast against the queries' batch of per-token angles.
    ours = rope_kernels.apply_rotary_pos_emb(q, k[:1], cos, sin)
    theirs = TRANSFORMERS_APPLY(q, k[:1], cos, sin)
    for got, want in zip(ours, theirs):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_fused_op_serves_what_transformers_passes() -> None:
    # The fast path is taken (not the formula) for the forms models pass: one fused_qk call each.
    calls = []
    cos, sin, _, _ = per_token_tables("per_batch", "cpu", torch.float32)
    q, k = q_and_k("cpu", torch.float32)

    class CountRopeCalls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            calls.append(func)
            return func(*args, **(kwargs or {}))

    partial_cos, partial_sin, _, _ = per_token_tables("per_batch", "cpu", torch.float32, rotary_dim=HEAD_DIM // 2)
    q_last, k_last = q.transpose(1, 2), k.transpose(1, 2)
    shared_cos, shared_sin = cos[:1], sin[:1]
    with CountRopeCalls():
        rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
        rope_kernels.apply_rotary_pos_emb(q, k, shared_cos, shared_sin)
        rope_kernels.apply_rotary_pos_emb(q, k, partial_cos, partial_sin)  # partial rotary
        rope_kernels.apply_rotary_pos_emb(q_last, k_last, cos, sin, unsqueeze_dim=2)  # (batch, seq, heads, dim)
    # One op call each and nothing around it (no concatenation, no transposes).
    assert calls == [torch.ops.rope.fused_qk.default] * 4, calls




@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device: str, dynamic: bool, fresh_dynamo: Any) -> None:
    compiled = torch.compile(rope_kernels.apply_rotary_pos_emb, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    # The whole width, the same per sequence, partial rotary, and (batch, seq, heads, dim) q and k.
    for form, rotary_dim, unsqueeze_dim in (("per_batch", HEAD_DIM, 1), ("shared", HEAD_DIM, 1),
                                            ("per_batch", HEAD_DIM // 2, 1), ("per_batch", HEAD_DIM, 2)):
        cos, sin, _, _ = per_token_tables(form, device, torch.float32, rotary_dim=rotary_dim)
        q, k = q_and_k(device, torch.float32, heads_second=unsqueeze_dim == 1)
        for got, want in zip(compiled(q, k, cos, sin, None, unsqueeze_dim),
                             rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, None, unsqueeze_dim)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript() -> None:
    scripted = torch.jit.script(rope_kernels.apply_rotary_pos_emb)
    for form in ("per_batch", "table_2d"):
        cos, sin, position_ids, _ = per_token_tables(form, "cpu", torch.float32)
        q, k = q_and_k("cpu", torch.float32)
        for got, want in zip(scripted(q, k, cos, sin, position_ids),
                             rope_kernels.apply_rotary_pos_emb(q, k, cos, sin, position_ids)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def q_and_k_laid_out(layout: str, device: str, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, seq, dim) q and k in memory layouts attention code produces (made on the
    device itself: copying a view with gaps to another device would make it contiguous)."""
    if layout == "projection":  # transposed (batch, seq, heads, dim) projections
        q = torch.randn(BATCH, seq, HEADS_Q, HEAD_DIM, device=device).transpose(1, 2)
        k = torch.randn(BATCH, seq, HEADS_K, HEAD_DIM, device=device).transpose(1, 2)
    elif layout == "fused_qkv":  # Phi-3: slices of one (batch, seq, (Hq + 2 Hk) * dim) projection
        qkv = torch.randn(BATCH, seq, (HEADS_Q + 2 * HEADS_K) * HEAD_DIM, device=device)
        q = qkv[..., :HEADS_Q * HEAD_DIM].view(BATCH, seq, HEADS_Q, HEAD_DIM).transpose(1, 2)
        k = qkv[..., HEADS_Q * HEAD_DIM:(HEADS_Q + HEADS_K) * HEAD_DIM].view(BATCH, seq, HEADS_K, HEAD_DIM).transpose(1, 2)
    elif layout == "contiguous":  # (batch, heads, seq, dim): sequences cannot be seen as one
        q = torch.randn(BATCH, HEADS_Q, seq, HEAD_DIM, device=device)
        k = torch.randn(BATCH, HEADS_K, seq, HEAD_DIM, device=device)
    else:
        raise ValueError(layout)
    return q, k


@pytest.mark.parametrize("seq", [SEQ, 1], ids=["prefill", "decode_step"])
@pytest.mark.parametrize("layout", ["projection", "fused_qkv", "contiguous"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_angles_in_every_layout(device: str, layout: str, seq: int) -> None:
    rotary, like = rotary_embedding(device, torch.float32)
    positions = torch.randint(0, MAX_SEQ, (BATCH, seq)).to(device)
    cos, sin = rotary(like, positions)
    q, k = q_and_k_laid_out(layout, device, seq)
    counter = []

    class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            counter.append(func)
            return func(*args, **(kwargs or {}))

    with RecordOps():
        ours = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
    theirs = TRANSFORMERS_APPLY(q, k, cos, sin)
    for x, got, want in zip((q, k), ours, theirs):
        assert_like_transformers(got, want, reference(x, cos, sin, positions, True), x)
        assert_output_layout(got, x)  # seen as one sequence or not, the result is laid out like x
    # The per-token angles are one table per sequence to the op: one call, whatever the layout,
    # with no positions tensor made and nothing reshaped or copied around it.
    assert counter == [torch.ops.rope.fused_qk.default]


def _one_angle_per_pair_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                                  interleaved: bool) -> torch.Tensor:
    # GPT-OSS's _apply_rotary_emb (half-split) and OpenAI's privacy filter's (interleaved), in float64.
    x, cos, sin = x.double(), cos.double().unsqueeze(unsqueeze_dim), sin.double().unsqueeze(unsqueeze_dim)
    first, second = (x[..., ::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    out = (first * cos - second * sin, second * cos + first * sin)
    return torch.stack(out, dim=-1).flatten(-2) if interleaved else torch.cat(out, dim=-1)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half-split", "interleaved"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_tables_of_one_angle_per_pair(device: str, dtype: torch.dtype, unsqueeze_dim: int, interleaved: bool) -> None:
    # cos/sin (batch, seq, head_dim / 2) as GPT-OSS's rotary embedding makes them: every feature
    # rotated, each pair by its one column; the op reads such tables as they are.
    from rope_kernels.hf_interleaved import fused_interleaved_pos_emb

    fused = fused_interleaved_pos_emb if interleaved else rope_kernels.hf_compat.fused_rotary_pos_emb
    batch, seq, heads_q, heads_k, head_dim = 2, 9, 4, 2, 64
    shape = (lambda h: (batch, h, seq, head_dim)) if unsqueeze_dim == 1 else (lambda h: (batch, seq, h, head_dim))
    q = torch.randn(shape(heads_q), device=device).to(dtype)
    k = torch.randn(shape(heads_k), device=device).to(dtype)
    angles = torch.rand(batch, seq, head_dim // 2, device=device) * 6
    cos, sin = angles.cos(), angles.sin()
    got = fused(q, k, cos, sin, None, unsqueeze_dim, True, tables="once")
    assert got is not None
    for out, x in zip(got, (q, k)):
        assert out.dtype == dtype and out.shape == x.shape
        expected = _one_angle_per_pair_reference(x, cos, sin, unsqueeze_dim, interleaved)
        torch.testing.assert_close(out.double(), expected, **tolerance(dtype))
    # Tables of another width are not of this form: left to the caller's own function.
    assert fused(q, k, cos[..., :16], sin[..., :16], None, unsqueeze_dim, True, tables="once") is None


def test_an_unknown_table_form_is_refused() -> None:
    q = torch.randn(1, 2, 3, 8)
    angles = torch.rand(1, 3, 8)
    with pytest.raises(ValueError, match="rope_kernels: tables must be 'twice', 'once' or 'pairwise'; got halves"):
        rope_kernels.hf_compat.fused_rotary_pos_emb(q, q, angles.cos(), angles.sin(), tables="halves")


def _rotated_reference(x: torch.Tensor, angles: torch.Tensor, unsqueeze_dim: int, interleaved: bool,
                       sign: float = 1.0) -> torch.Tensor:
    # The first 2 * angles.shape[-1] features of x turned pair by pair by sign * angle, the rest
    # passed through, in float64.
    width = 2 * angles.shape[-1]
    x = x.double()
    cos = angles.double().cos().unsqueeze(unsqueeze_dim)
    sin = (sign * angles.double()).sin().unsqueeze(unsqueeze_dim)
    rotated, rest = x[..., :width], x[..., width:]
    first, second = (rotated[..., ::2], rotated[..., 1::2]) if interleaved else rotated.chunk(2, dim=-1)
    out = (first * cos - second * sin, second * cos + first * sin)
    turned = torch.stack(out, dim=-1).flatten(-2) if interleaved else torch.cat(out, dim=-1)
    return torch.cat([turned, rest], dim=-1)


@pytest.mark.parametrize("calls", ["pair", "one"], ids=["q-and-k", "one-tensor"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_tables_with_each_angle_at_both_features_of_its_pair(device: str, dtype: torch.dtype, unsqueeze_dim: int,
                                                             rotary_dim: int, calls: str) -> None:
    # cos/sin (batch, seq, R) as Cohere's rotary embedding makes them, repeat_interleave(freqs, 2):
    # interleaved pairs over the first R features, the op reading every second column; q and k in
    # one call (rope::fused_qk) or one tensor a call (rope::fused).
    from rope_kernels.hf_interleaved import fused_interleaved_pos_emb, fused_interleaved_pos_emb_one

    batch, seq, heads_q, heads_k, head_dim = 2, 9, 4, 2, 64
    shape = (lambda h: (batch, h, seq, head_dim)) if unsqueeze_dim == 1 else (lambda h: (batch, seq, h, head_dim))
    q = torch.randn(shape(heads_q), device=device).to(dtype)
    k = torch.randn(shape(heads_k), device=device).to(dtype)
    angles = torch.rand(batch, seq, rotary_dim // 2, device=device) * 6
    pairwise = angles.repeat_interleave(2, dim=-1)
    cos, sin = pairwise.cos(), pairwise.sin()
    if calls == "pair":
        got = fused_interleaved_pos_emb(q, k, cos, sin, None, unsqueeze_dim, True, tables="pairwise")
    else:
        got = tuple(fused_interleaved_pos_emb_one(x, cos, sin, unsqueeze_dim, True, tables="pairwise") for x in (q, k))
    assert got is not None and None not in got
    for out, x in zip(got, (q, k)):
        assert out.dtype == dtype and out.shape == x.shape
        expected = _rotated_reference(x, angles, unsqueeze_dim, interleaved=True)
        torch.testing.assert_close(out.double(), expected, **tolerance(dtype))
    # An odd width is not a table of pairs: left to the caller's own function.
    odd = pairwise[..., :-1]
    assert fused_interleaved_pos_emb(q, k, odd.cos(), odd.sin(), None, unsqueeze_dim, True, tables="pairwise") is None


@pytest.mark.parametrize("calls", ["pair", "one"], ids=["q-and-k", "one-tensor"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_pairs_turned_by_the_negated_angle(device: str, dtype: torch.dtype, unsqueeze_dim: int, rotary_dim: int,
                                           calls: str) -> None:
    # NanoChat's rotate_half, cat(x2, -x1): each half-split pair turned by -angle, through the op's
    # gradient (rope::fused_qk_backward, or rope::fused_backward one tensor a call), whose own
    # gradient (the turn by +angle) autograd takes.
    batch, seq, heads_q, heads_k, head_dim = 2, 9, 4, 2, 64
    shape = (lambda h: (batch, h, seq, head_dim)) if unsqueeze_dim == 1 else (lambda h: (batch, seq, h, head_dim))
    q = torch.randn(shape(heads_q), device=device).to(dtype).requires_grad_()
    k = torch.randn(shape(heads_k), device=device).to(dtype).requires_grad_()
    angles = torch.rand(batch, seq, rotary_dim // 2, device=device) * 6
    twice = torch.cat([angles, angles], dim=-1)
    cos, sin = twice.cos(), twice.sin()
    if calls == "pair":
        got = rope_kernels.hf_compat.fused_rotary_pos_emb(q, k, cos, sin, None, unsqueeze_dim, True, reverse=True)
    else:
        got = tuple(rope_kernels.hf_compat.fused_rotary_pos_emb_one(x, cos, sin, unsqueeze_dim, True, reverse=True)
                    for x in (q, k))
    assert got is not None and None not in got
    for out, x in zip(got, (q, k)):
        assert out.dtype == dtype and out.shape == x.shape
        expected = _rotated_reference(x.detach(), angles, unsqueeze_dim, interleaved=False, sign=-1.0)
        torch.testing.assert_close(out.double(), expected, **tolerance(dtype))
    weights = [torch.randn_like(out) for out in got]
    grads = torch.autograd.grad(sum((out * w).sum() for out, w in zip(got, weights)), (q, k))
    for grad, w in zip(grads, weights):  # the gradient of a turn by -angle is the turn by +angle
        expected = _rotated_reference(w, angles, unsqueeze_dim, interleaved=False, sign=1.0)
        torch.testing.assert_close(grad.double(), expected, **tolerance(dtype))
