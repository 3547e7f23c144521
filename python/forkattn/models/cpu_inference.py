"""BERT's inference fast path on CPU (issue #18): what a BertLayer does differently when nothing
needs gradients. docs/CPU_INFERENCE.md has the measurements behind each step.

- The fused QKV GEMM reads one [3H, H] weight. Under autograd it is a fresh torch.cat every forward
  (gradients must reach the three Linears); otherwise it is built once and kept until one of its
  parameters changes (`cached`).
- In eval mode without autograd, for contiguous fp32 CPU activations (`fast_path`), the layer's four
  weights are also kept pre-packed: into panels for forkattn's own GEMM (csrc/cpu/gemm_cpu.cpp,
  `_C.gemm_pack_cpu`: 48 columns wide for its AVX-512 tile, 24 for its AVX2 tile, the width of the
  CPU kernel variant in use; `PANEL_GEMM`, when that variant is not "default") or else for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing
  uses, the GEMMs through `torch.ops.mkldnn._linear_pointwise`); after
  the attention, `LN(x + W_o y + b_o)` and `LN(x + W_2 h + b_2)` are bias-less GEMMs each followed
  by one in-place C++ pass (csrc/cpu/encoder_cpu.cpp: bias + residual + LayerNorm) instead of
  addmm's bias copy and separate add and LayerNorm ops; `gelu(W_1 x + b_1)` is a bias-less GEMM
  and the C++ bias + GELU pass (AVX2 erf polynomial; faster here than oneDNN's GELU post-op).
  Dropout is the identity in eval mode; training, autograd and other dtypes take the module path.
- Without a mask, and on a padded batch's packed real tokens (`native_layer`), the whole layer is
  one C++ call (csrc/encoder_layer.cpp: `_C.encoder_layer_varlen_cpu`) that runs the same packed
  GEMMs, attention kernel (per sequence) and fused epilogues over row blocks on threads that take
  blocks one at a time and never wait for a thread that has not started: torch's OpenMP regions
  wait for every thread at their barrier, which on a loaded machine is most of a batch-1 forward.
  With few rows per thread (batch 1, `COL_SPLIT_ROWS`) it splits each GEMM over output columns
  instead (`_C.encoder_layer_cols_cpu`: ranges of panels of the one panel weight, each stored
  straight into its columns with the bias / bias + GELU in the GEMM's store; oneDNN weights are cut
  into column parts instead, `column_weights`).

Cache validity: every in-place update bumps a tensor's version counter (optimizer steps,
load_state_dict, `with torch.no_grad(): p.mul_(...)`), and `.to()`, `p.data = ...` or a replaced
Parameter change the tensor behind the name; a cache entry remembers the parameters it was built
from (holding them, so their memory cannot be reused by another tensor while it compares) and is
rebuilt when any differs. Entries live in the module's __dict__, outside its state dict.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _native

# Switches for benchmarks and tests (python -m forkattn.bench.profile_bert compares them).
FUSED = True  # the fast path at all (cached packed weights, fused C++ epilogues)
PACKED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
PACK_ROWS_HINT = 128  # the token count oneDNN picks the packed weight layout for (any count runs)
NATIVE_LAYER = True  # batch 1 without a mask: one native call per layer (native_layer)
CHUNKS_PER_THREAD = 1  # row blocks per thread in the native layer (2, 8: slower at B1 L128, see docs)
BLOCK_ROWS = 256  # and at most this many rows per block (padded batches: balance, intermediates in cache)
# Below this many rows per thread (batch 1 L128 at 2 threads: 64) the native layer splits every GEMM
# over output columns instead (_C.encoder_layer_cols_cpu): each thread's GEMM keeps all rows, on
# its own pre-packed slice of the weight (docs/CPU_INFERENCE.md, "GEMMs split over output columns").
COL_SPLIT_ROWS = 128
COL_ALIGN = 16  # column parts start at multiples of this where the width allows (the GEMMs' N blocking)
COL_PARTS_PER_THREAD = 1  # column parts per thread (more: finer load balance, narrower GEMMs)
# forkattn's packed-panel GEMM (csrc/cpu/gemm_cpu.cpp: AVX-512 or AVX2 tile) for the fast path's weights:
# None (default) where it is measured fastest (weight_kind), True wherever the CPU kernel variant in use
# has a tile (not "default"), False never (oneDNN / ATen then, as PACKED says)
PANEL_GEMM = None
SERIAL_TORCH_OPS = True  # torch's ops around column-split native layers (embeddings, pooler) on one thread (serial_torch_ops)


def cached(owner: nn.Module, slot: str, params: Sequence[Tensor], build: Callable[[Sequence[Tensor]], object]):
    """build(params), kept in owner.__dict__[slot] until one of params changes (module docstring)."""
    entry = owner.__dict__.get(slot)
    if entry is not None and _unchanged(entry[0], params):
        return entry[1]
    if any(p.is_inference() for p in params):  # built under inference_mode: no version counter to watch
        return build(params)
    # normal tensors even when called under inference_mode: a later no_grad or autograd call with
    # frozen parameters may hand them to an op that saves its inputs for backward
    with torch.inference_mode(False), torch.no_grad():
        entry = (tuple((p.detach(), p._version) for p in params), build(params))
    owner.__dict__[slot] = entry
    return entry[1]


def _unchanged(sources, params: Sequence[Tensor]) -> bool:
    return len(sources) == len(params) and all(
        p.data_ptr() == s.data_ptr() and p._version == v and p.shape == s.shape for (s, v), p in zip(sources, params))


def _qkv_params(layer: nn.Module) -> Tuple[Tensor, ...]:
    s = layer.attention.self
    return s.query.weight, s.key.weight, s.value.weight, s.query.bias, s.key.bias, s.value.bias


def _cat_qkv(p: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    return torch.cat(p[:3]), torch.cat(p[3:6])


class Weights(NamedTuple):
    """A layer's GEMM weights for the fast path, of one `kind`: "panel" ([panels, in, width], packed by
    _C.gemm_pack_cpu for forkattn's GEMM in the CPU kernel variant in use, whose panel width the
    native code checks), "onednn" (packed for oneDNN) or "plain" ([out, in])."""
    qkv: Tensor
    qkv_bias: Tensor
    attn_out: Tensor
    inter: Tensor
    out: Tensor
    packed: bool  # oneDNN-packed (the native layer's `packed` argument)
    kind: str = "plain"


def _cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (F, BW, VL, DQ: what forkattn's avx512 variant needs), which
    oneDNN then uses whatever variant forkattn runs (csrc/cpu_dispatch.cpp runs_here)."""
    global _AVX512
    if _AVX512 is None:
        C = _native._C
        _AVX512 = C is not None and "avx512" in C.cpu_isas_supported()
    return _AVX512


_AVX512: Optional[bool] = None


def weight_kind() -> str:
    """The kind of fast-path weights to build now (Weights.kind), from PANEL_GEMM, PACKED and the CPU
    kernel variant in use. By default the panel GEMM where it was measured fastest
    (docs/CPU_INFERENCE.md, "An AVX-512 tile"): its AVX-512 tile (1.0-1.2x oneDNN per GEMM at BERT's
    shapes), and its AVX2 tile on a CPU without AVX-512 (1.03-1.17x oneDNN's AVX2 kernels); but not the
    AVX2 tile on an AVX-512 CPU (a variant forced with FORKATTN_CPU_CAPABILITY=avx2), where oneDNN
    runs its AVX-512 kernels at ~2x the tile's rate (MiniLM B1: 20 ms oneDNN vs 28 ms panel)."""
    C = _native._C
    isa = C.cpu_isa() if C is not None and hasattr(C, "gemm_pack_cpu") else "default"
    fastest = isa == "avx512" or (isa == "avx2" and not (PACKED and _cpu_has_avx512()))
    if isa != "default" and (PANEL_GEMM or (PANEL_GEMM is None and fastest)):
        return "panel"
    return "onednn" if PACKED else "plain"


def _pack(p: Sequence[Tensor], kind: str) -> Weights:
    qkv, qkv_bias = _cat_qkv(p)
    ws = (qkv, *p[6:9])
    if kind == "panel":
        ws = tuple(_native._C.gemm_pack_cpu(w) for w in ws)
    elif kind == "onednn":
        ws = tuple(torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in ws)
    return Weights(ws[0], qkv_bias, *ws[1:], packed=kind == "onednn", kind=kind)


def fast_path(layer: nn.Module, x: Tensor) -> Optional[Weights]:
    """The layer's cached fast-path weights when it may run the fast path on activations x, else None."""
    if not (FUSED and _native._C is not None and not layer.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    kind = weight_kind()
    # panels of one width per slot: a process that switches CPU kernel variants (FORKATTN_CPU_CAPABILITY,
    # _C._choose_cpu_isa) packs again for the new width instead of handing the GEMM the old layout
    slot = f"_fast_weights_panel{_native._C.gemm_panel_cols()}" if kind == "panel" else f"_fast_weights_{kind}"
    return cached(layer, slot, _qkv_params(layer) + (
        layer.attention.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight),
        lambda ps: _pack(ps, kind))


@contextlib.contextmanager
def serial_torch_ops(ids: Tensor) -> Iterator[None]:
    """torch on one thread inside the block when the encoder's native layers will split columns over
    the rows of token ids `ids` (CPU, no autograd, threads > 1, fewer than COL_SPLIT_ROWS rows per
    thread: batch 1). Used around the embeddings before the first layer and the pooler after the
    last. Their element-wise ops are OpenMP regions (the pooler's tanh goes to MKL's VML, which opens
    one even for a single row), and after each one torch's idle OpenMP worker spins (libgomp's
    default wait policy: ~6.5 ms on this Zen 5) on one of the cores the layers' own two threads
    need: the embeddings' regions measured ~20 ms of CPU per MiniLM B1 forward, the pooler's ~6.5 ms
    spilling into the next forward when forwards run back to back (docs/CPU_INFERENCE.md). At these
    sizes the ops gain nothing from a second thread. The thread count is restored on exit."""
    threads = torch.get_num_threads()
    if not (SERIAL_TORCH_OPS and FUSED and NATIVE_LAYER and ids.device.type == "cpu" and threads > 1
            and ids.numel() < COL_SPLIT_ROWS * threads and not torch.is_grad_enabled()):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def column_parts(n: int, parts: int, align: int = COL_ALIGN) -> List[int]:
    """Widths of `parts` (fewer when n < parts) non-empty column blocks covering n columns, balanced,
    every border at a multiple of `align` where n allows it."""
    parts = max(1, min(parts, n))
    unit = align if n >= align * parts else 1
    borders = [0] + [round(n * p / parts / unit) * unit for p in range(1, parts)] + [n]
    return [b - a for a, b in zip(borders, borders[1:]) if b > a]


class ColumnWeights(NamedTuple):
    """A layer's GEMM weights cut into column parts for the column-split native layer (packed for
    oneDNN part by part when `packed`)."""
    qkv: List[Tensor]
    attn_out: List[Tensor]
    inter: List[Tensor]
    out: List[Tensor]
    packed: bool


def _split_pack(p: Sequence[Tensor], parts: int) -> ColumnWeights:
    qkv, _ = _cat_qkv(p)
    split = []
    for w in (qkv, *p[6:9]):
        ws = [t.contiguous() for t in torch.split(w, column_parts(w.shape[0], parts))]
        if PACKED:
            ws = [torch.ops.mkldnn._reorder_linear_weight(t, PACK_ROWS_HINT) for t in ws]
        split.append(ws)
    return ColumnWeights(*split, packed=PACKED)


def column_weights(layer: nn.Module, parts: int) -> ColumnWeights:
    """The layer's weights in `parts` column parts, cached as fast_path's are (module docstring)."""
    return cached(layer, f"_fast_cols{parts}_packed{int(PACKED)}", _qkv_params(layer) + (
        layer.attention.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight),
        lambda ps: _split_pack(ps, parts))


def panel_linear(x: Tensor, w: Tensor, n: int, bias: Optional[Tensor] = None) -> Tensor:
    """x @ W^T (+ bias) as a new [..., n] with forkattn's packed-panel GEMM, w = _C.gemm_pack_cpu(W)."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = x2.new_empty(x2.shape[0], n)
    _native._C.gemm_packed_cpu(x2, w, n, bias, 0 if bias is None else 1, y, 0, n)
    return y.view(*x.shape[:-1], n)


def _linear(x: Tensor, w: Tensor, bias: Optional[Tensor], fast: Weights, n: int) -> Tensor:
    """x @ W^T (+ bias) for one of fast's weights W [n, in]."""
    if fast.kind == "panel":
        return panel_linear(x, w, n, bias)
    if fast.packed:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def qkv_projection(layer: nn.Module, x: Tensor, fast: Optional[Weights]) -> Tensor:
    """x @ [W_q; W_k; W_v]^T + [b_q; b_k; b_v]: [..., 3 * hidden]; fast = fast_path(layer, x)."""
    if fast is not None:
        return _linear(x, fast.qkv, fast.qkv_bias, fast, fast.qkv_bias.shape[0])
    p = _qkv_params(layer)
    if torch.is_grad_enabled() and any(t.requires_grad for t in p):
        w, b = _cat_qkv(p)  # fresh, so gradients reach the three Linears
    else:
        w, b = cached(layer, "_qkv", p, _cat_qkv)
    return F.linear(x, w, b)


def fused_epilogues(layer: nn.Module, x: Tensor, y: Tensor, fast: Weights) -> Tensor:
    """The rest of a BertLayer after attention on the fast path: x the layer input, y the attention
    output (both [..., hidden], contiguous fp32 CPU), fast = fast_path(layer, x)."""
    C = _native._C
    att_out, inter, out = layer.attention.output, layer.intermediate.dense, layer.output
    H, I = x.shape[-1], inter.out_features
    h = _linear(y, fast.attn_out, None, fast, H)
    ln = att_out.LayerNorm
    C.bias_residual_layernorm_cpu(h, x, att_out.dense.bias, ln.weight, ln.bias, ln.eps)
    if layer.config.hidden_act == "gelu":  # GEMM, then one vectorised bias + erf-GELU pass (not oneDNN's
        a = _linear(h, fast.inter, None, fast, I)  # GELU post-op: 0.7-1.4 ms slower per call, docs)
        C.bias_gelu_cpu(a, inter.bias)
    else:  # the tanh GELUs: vec.h has no Sleef-free tanh, so the activation stays ATen's
        a = layer.act(_linear(h, fast.inter, inter.bias, fast, I))
    o = _linear(a, fast.out, None, fast, H)
    ln = out.LayerNorm
    C.bias_residual_layernorm_cpu(o, h, out.dense.bias, ln.weight, ln.bias, ln.eps)
    return o


def row_chunks(rows: int, threads: int) -> int:
    """How many row blocks the native layer cuts `rows` rows into on `threads` threads: at most
    BLOCK_ROWS rows each (big batches: intermediates stay in cache), at least CHUNKS_PER_THREAD per
    thread, and a multiple of the thread count, so that no thread is left with one block more than
    the others in every round (BERT-base B4 L512 padded: 1568 rows made 7 blocks, 4 on one thread
    and 3 on the other)."""
    blocks = -(-rows // BLOCK_ROWS)
    if threads <= 1:
        return max(1, blocks)
    return max(CHUNKS_PER_THREAD, -(-blocks // threads)) * threads


def native_layer(layer: nn.Module, x: Tensor, key_padding_mask: Optional[Tensor], fast: Optional[Weights],
                 backend: Optional[str], packing=None) -> Optional[Tensor]:
    """The whole layer in one native call (csrc/encoder_layer.cpp) when it applies: the fast path
    (fast = fast_path(layer, x)), exact GELU, the cpu attention backend (or none pinned), and either
    unmasked sequences x [B, L, hidden] or a padded batch's packed tokens x [T, hidden] with
    `packing` (models/padding.Packing). None when it does not apply (the caller runs the ops)."""
    C = _native._C
    if not (NATIVE_LAYER and fast is not None and key_padding_mask is None and layer.config.hidden_act == "gelu"
            and backend in (None, "cpu") and hasattr(C, "encoder_layer_varlen_cpu")):
        return None
    if packing is not None:
        if x.dim() != 2:
            return None
        rows, cu = x, packing.cu_seqlens
    elif x.dim() == 3:
        B, L, H = x.shape
        rows, cu = x.view(B * L, H), torch.arange(0, B * L + 1, max(L, 1), dtype=torch.int64)
        if L == 0:
            return None
    else:
        return None
    threads = torch.get_num_threads()
    chunks = row_chunks(rows.shape[0], threads)
    att, out = layer.attention.output, layer.output
    tail = (att.dense.bias, att.LayerNorm.weight, att.LayerNorm.bias, att.LayerNorm.eps)
    ffn_b, ln2 = layer.intermediate.dense.bias, (out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias,
                                                 out.LayerNorm.eps)
    if threads > 1 and rows.shape[0] < COL_SPLIT_ROWS * threads and fast.kind == "panel":
        # one panel weight per GEMM: the native layer splits its panels over the threads
        y = C.encoder_layer_cols_cpu(rows, cu, [fast.qkv], fast.qkv_bias, [fast.attn_out], *tail, [fast.inter], ffn_b,
                                     [fast.out], *ln2, layer.num_heads, False, chunks, threads)
    elif threads > 1 and rows.shape[0] < COL_SPLIT_ROWS * threads and hasattr(C, "encoder_layer_cols_cpu"):
        cw = column_weights(layer, COL_PARTS_PER_THREAD * threads)
        y = C.encoder_layer_cols_cpu(rows, cu, cw.qkv, fast.qkv_bias, cw.attn_out, *tail, cw.inter, ffn_b, cw.out,
                                     *ln2, layer.num_heads, cw.packed, chunks, threads)
    else:
        y = C.encoder_layer_varlen_cpu(rows, cu, fast.qkv, fast.qkv_bias, fast.attn_out, *tail, fast.inter, ffn_b,
                                       fast.out, *ln2, layer.num_heads, fast.packed, chunks, threads)
    return y.view_as(x)
