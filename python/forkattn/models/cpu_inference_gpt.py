"""GPT-2's inference fast path on CPU (issue #18): what a Block and the LM head do when nothing
needs gradients. The measurements behind it are in docs/CPU_INFERENCE_GPT.md.

A decode step at batch 1 is GEMVs over every weight (85M layer parameters + the 38.6M-entry LM
head tied to wte): the time is streaming weights from memory, and how fast MKL streams them
depends on their layout. Measured on one thread here (M = rows of the activation; each weight x12
copies, so nothing stays in cache, as in a decode step):

- M = 1: `x @ W_t` on the [in, out] layout (transformers' Conv1D layout) is faster than F.linear on
  nn.Linear's [out, in] when out >= in (c_attn 73 vs 106 ms per 12 layers, c_fc 95 vs 135, the
  LM head 31 vs 49 ms) and slower when in > out (the MLP's c_proj 147 vs 100 ms): each one-row
  weight is kept in its faster layout; oneDNN's packed weights are the slowest at M = 1.
- M = 1 with more than one thread: MKL runs the GEMV on the calling thread alone (at 2 threads all
  of the CPU time of 12 c_fc GEMVs is the main thread's), so a batch-1 step used one core for its
  weights; `_C.linear_split_cpu` gives each thread a contiguous chunk of the output columns, each
  its own MKL GEMV on the same layout (SPLIT_ROW_GEMMS).
- M > 1 (batch 8 decode, every prefill): oneDNN-packed weights (`torch.ops.mkldnn`, as BERT's fast
  path in cpu_inference.py) with the bias, the tanh-GELU and the residual add inside the GEMM call;
  the LM head at M = 8 200 -> 110 ms.

Each Block keeps its four weights for the row count it runs at (slot "row": one row, "rows":
packed), built on first use and kept until a parameter changes (cpu_inference.cached: version
counters and data pointers; the entries live in the module's __dict__, never in its state dict);
the LM head's copy is kept on the GPT module, keyed on wte.weight, so the tie holds: any update of
the embedding rebuilds it.

The fast path runs only in eval mode, without autograd, for contiguous fp32 CPU activations with
forkattn's native extension loaded; `FUSED = False` turns it off. Training, autograd, other dtypes
and devices run the unchanged module path (models/gpt.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forkattn

from .. import _native
from .cpu_inference import PACKED, cached

FUSED = True  # the GPT-2 fast path at all (tests and the bench switch it off for comparison)
ONE_ROW_LAYOUT = True  # one-row GEMMs on their own layouts (else packed / plain at every size)
# One-row GEMMs with more than one thread: the weight's output columns split across the threads
# (_C.linear_split_cpu, csrc/gemv.h), since MKL runs an M = 1 GEMM on the calling thread only.
SPLIT_ROW_GEMMS = True
_SPLIT = getattr(_native._C, "linear_split_cpu", None)  # None with an extension built before it


class Weight(NamedTuple):
    """A GEMM weight in one layout: "t" ([in, out], for x @ w), "p" (oneDNN-packed) or "n"
    (nn.Linear's [out, in] as is)."""
    w: Tensor
    layout: str


class BlockWeights(NamedTuple):
    qkv: Weight
    attn_proj: Weight
    fc: Weight
    mlp_proj: Weight


def _kind(rows: int) -> str:
    """"row" for one-row GEMMs (a batch-1 decode step), "rows" otherwise: the cache slot's name."""
    return "row" if rows == 1 and ONE_ROW_LAYOUT else "rows"


def _convert(w: Tensor, kind: str, rows: int) -> Weight:
    """nn.Linear's weight [out, in] in the fastest layout for `kind`. One row: GEMVs stream the
    weight from memory, and MKL streams the [in, out] layout faster when out >= in (c_attn, c_fc,
    the LM head) and [out, in] when in > out (the MLP's c_proj): module docstring."""
    if kind == "row":
        return Weight(w.t().contiguous(), "t") if w.shape[0] >= w.shape[1] else Weight(w, "n")
    if PACKED:
        return Weight(torch.ops.mkldnn._reorder_linear_weight(w, rows), "p")
    return Weight(w, "n")


def enabled(module: nn.Module, x: Tensor, any_layout: bool = False) -> bool:
    """Whether `module` may run the fast path on activations x (contiguous unless any_layout)."""
    return (FUSED and _native._C is not None and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and (any_layout or x.is_contiguous()))


def _block_params(block: nn.Module) -> Sequence[Tensor]:
    return (block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight)


def block_weights(block: nn.Module, rows: int) -> BlockWeights:
    kind = _kind(rows)
    hint = max(rows, 8)  # one packing serves every row count (cpu_inference.py measured it for BERT)
    return cached(block, f"_gpt_fast_{kind}", _block_params(block),
                  lambda p: BlockWeights(*(_convert(w, kind, hint) for w in p)))


def _linear(x: Tensor, weight: Weight, b: Optional[Tensor], post: str = "none",
            residual: Optional[Tensor] = None) -> Tensor:
    """act(x @ W^T + b) (+ residual), x 2-D. post: "none" or "gelu_tanh"."""
    w, layout = weight
    if layout == "p":
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
        if post == "gelu_tanh":
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if x.shape[0] == 1 and SPLIT_ROW_GEMMS and _SPLIT is not None and torch.get_num_threads() > 1:
        y = _SPLIT(x, w, b, layout == "t")  # MKL runs M = 1 on one thread only
    elif layout == "t":
        y = torch.addmm(b, x, w) if b is not None else torch.mm(x, w)
    else:
        y = F.linear(x, w, b)
    if post == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y += residual
    return y


_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def block_forward(block: nn.Module, x: Tensor, key_padding_mask: Optional[Tensor], cache) -> Tensor:
    """Block.forward on the fast path (enabled(block, x) holds): x [B, T, C] -> [B, T, C]."""
    attn, mlp = block.attn, block.mlp
    B, T, C = x.shape
    w = block_weights(block, B * T)
    x2 = x.view(B * T, C)
    h = F.layer_norm(x2, (C,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    qkv = _linear(h, w.qkv, attn.c_attn.bias)
    q, k, v = qkv.view(B, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
    if cache is None:
        y = forkattn.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=attn.scale,
                               backend=attn.backend)
    else:
        y = cache.attend(attn.layer_idx, q, k, v, scale=attn.scale, backend=attn.backend)
    y = y.transpose(1, 2).reshape(B * T, C)
    x2 = _linear(y, w.attn_proj, attn.c_proj.bias, residual=x2)
    h = F.layer_norm(x2, (C,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    if attn.config.activation_function in _TANH_GELUS:
        a = _linear(h, w.fc, mlp.c_fc.bias, post="gelu_tanh")
    else:
        a = mlp.act(_linear(h, w.fc, mlp.c_fc.bias))
    x2 = _linear(a, w.mlp_proj, mlp.c_proj.bias, residual=x2)
    return x2.view(B, T, C)


def lm_head(model: nn.Module, h: Tensor) -> Tensor:
    """model.lm_head(h) on the fast path (enabled(model, h) holds), h [..., C] -> [..., V]. The
    weight is wte's (tied): its converted copy is rebuilt whenever wte.weight changes."""
    C = h.shape[-1]
    h2 = h.reshape(-1, C)
    rows = h2.shape[0]
    kind = _kind(rows)
    w = cached(model, f"_gpt_fast_lm_head_{kind}", (model.lm_head.weight,),
               lambda p: _convert(p[0], kind, max(rows, 8)))
    y = _linear(h2, w, None)
    return y.view(*h.shape[:-1], y.shape[-1])
