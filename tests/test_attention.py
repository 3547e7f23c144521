"""forkattn.attention against an fp64 reference (2x the error of eager in the same dtype),
for every fused backend that can run on this machine's CPU tensors ("cpu" always; "triton"
under TRITON_INTERPRET=1, at interpreter-sized shapes and without bf16 dots)."""
import pytest
import torch

import forkattn
from attn_utils import backend_skip_reason, check_against_reference, make_padding, make_qkv

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip(backend, dtype=torch.float32, L=0):
    why = backend_skip_reason(backend)
    if why:
        pytest.skip(why)
    if backend == "triton":
        if dtype == torch.bfloat16:
            pytest.skip("triton 3.6's interpreter computes bf16 tl.dot wrongly; bf16 runs on the GPU")
        if L > 200:
            pytest.skip("too long for the Triton interpreter; covered on the GPU")


# (Lq, Lk): odd sizes, Lq != Lk both ways, block boundaries
LENGTHS = [(1, 1), (7, 7), (1, 97), (97, 129), (129, 97), (64, 64), (65, 63), (513, 513)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
def test_lengths(backend, dtype, causal, Lq, Lk):
    _skip(backend, dtype, max(Lq, Lk))
    if dtype != torch.float32 and (Lq, Lk) in [(65, 63), (1, 1)]:
        pytest.skip("covered in fp32")
    q, k, v = make_qkv(2, 3, 3, Lq, Lk, 64, dtype)
    check_against_reference(q, k, v, backend=backend, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq,Lk", [(97, 97), (33, 129), (129, 1)])
def test_key_padding(backend, dtype, causal, Lq, Lk):
    """Random padding lengths, with one sequence fully padded (its rows must be zeros)."""
    _skip(backend, dtype, max(Lq, Lk))
    B = 4
    q, k, v = make_qkv(B, 2, 2, Lq, Lk, 32, dtype)
    mask = make_padding(B, Lk, fully_padded=(2,))
    out = check_against_reference(q, k, v, backend=backend, causal=causal, key_padding_mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [32, 64, 128, 40])
def test_head_dims(backend, D):
    _skip(backend)
    if backend == "triton" and D == 40:
        pytest.skip("non-power-of-two head_dim is not a triton target")
    q, k, v = make_qkv(2, 2, 2, 65, 70, D, torch.float16)
    check_against_reference(q, k, v, backend=backend, key_padding_mask=make_padding(2, 70))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(backend, H, Hkv, causal):
    _skip(backend)
    q, k, v = make_qkv(2, H, Hkv, 37, 53, 64, torch.float32)
    check_against_reference(q, k, v, backend=backend, causal=causal, key_padding_mask=make_padding(2, 53))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_read_in_place(backend):
    """Transposes of [B, L, H, D] projections are read without a copy and give the same result."""
    _skip(backend)
    q, k, v = make_qkv(2, 4, 4, 33, 45, 64, torch.float32, strided=True)
    assert not q.is_contiguous()
    from forkattn._layout import stride1 as _stride1

    assert _stride1(q) is q and _stride1(k) is k
    mask = make_padding(2, 45)
    out = check_against_reference(q, k, v, backend=backend, causal=True, key_padding_mask=mask)
    dense = forkattn.attention(*(t.detach().contiguous() for t in (q, k, v)), causal=True,
                               key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layout_makes_merge_heads_free(backend):
    _skip(backend)
    B, H, L, D = 2, 3, 17, 32
    q, k, v = make_qkv(B, H, H, L, L, D, torch.float32, requires_grad=False)
    out = forkattn.attention(q, k, v, backend=backend)
    merged = out.transpose(1, 2).reshape(B, L, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_zero_output_and_grads(backend):
    """Rows with no visible key: padding-only sequences and, with causal Lq > Lk, the first
    Lq - Lk queries. Both give zeros forward and zero gradients, never NaN."""
    _skip(backend)
    q, k, v = make_qkv(2, 2, 2, 20, 12, 32, torch.float32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1] = False
    out = forkattn.attention(q, k, v, causal=True, key_padding_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :8], torch.zeros_like(out[0, :, :8]))  # query i sees j <= i - 8
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(q.grad[0, :, :8], torch.zeros_like(q.grad[0, :, :8]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_empty(backend):
    _skip(backend)
    q, k, v = make_qkv(1, 2, 2, 9, 11, 32, torch.float32)
    check_against_reference(q, k, v, backend=backend, scale=0.3)
    q0, k0, v0 = make_qkv(0, 2, 2, 9, 11, 32, torch.float32, requires_grad=False)
    assert forkattn.attention(q0, k0, v0, backend=backend).shape == (0, 2, 9, 32)


@pytest.mark.parametrize("shape", [(0, 2, 2, 9, 11), (1, 2, 2, 0, 11), (1, 2, 2, 9, 0), (1, 0, 1, 9, 11)],
                         ids=["batch0", "lq0", "lk0", "heads0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_of_empty_inputs(backend, shape):
    """Nothing to attend: the backward still runs (autograd's gradient of an empty output has
    stride 0, which no kernel reads) and gives zero gradients of the inputs' shapes."""
    _skip(backend)
    B, H, Hkv, Lq, Lk = shape
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, 32, torch.float32)
    out = forkattn.attention(q, k, v, backend=backend)
    assert out.shape == (B, H, Lq, 32)
    (out.sum() + 0 * (q.sum() + k.sum() + v.sum())).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()


def test_backend_none_picks_a_fused_backend_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float32, requires_grad=False)
    assert forkattn.select_backend(q) == "cpu"
    big = torch.randn(1, 1, 4, 512)
    assert forkattn.select_backend(big) == "eager"  # head_dim beyond the cpu kernel falls back


def test_eager_backend_is_the_reference():
    q, k, v = make_qkv(2, 2, 2, 9, 11, 32, torch.float32, requires_grad=False)
    m = make_padding(2, 11)
    torch.testing.assert_close(
        forkattn.attention(q, k, v, key_padding_mask=m, backend="eager"),
        forkattn.reference.attention(q, k, v, key_padding_mask=m),
        rtol=0, atol=0,
    )


def test_matches_sdpa_without_empty_rows():
    """The convention check against PyTorch itself: same layout, scale and causal alignment."""
    q, k, v = make_qkv(2, 4, 4, 31, 31, 64, torch.float32, requires_grad=False)
    for causal in (False, True):
        ours = forkattn.attention(q, k, v, causal=causal)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
    m = make_padding(2, 31)
    ours = forkattn.attention(q, k, v, key_padding_mask=m)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
