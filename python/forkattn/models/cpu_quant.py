"""Optional int8 / bf16 CPU inference for BERT-family encoders (issue #18). Never on by default:
a model runs fp32 unless it is passed through `quantize_for_cpu`. docs/CPU_QUANT.md has the
accuracy on real all-MiniLM-L6-v2 embeddings, the bar called "exact enough", and the speed.
Measured against that bar: bf16 passes (but is ~4-6x slower than fp32 on CPUs without native
bf16); int8 does NOT pass it (calibrated int8: embedding cosine to fp32 min 0.981, mean 0.997,
top-1 neighbour agreement 93%; ONNX Runtime's own dynamic int8 does worse): use int8 only
where a task-level check on your own data says its error is acceptable.

    from forkattn.models.cpu_quant import quantize_for_cpu
    qmodel = quantize_for_cpu(model, "int8", accept_inexact=True)   # a new, inference-only model; `model` is untouched
    with torch.inference_mode():
        out = qmodel(input_ids, attention_mask)

precision="int8" (forkattn's BERT family): every encoder layer's four GEMMs (QKV concatenated,
attention output, FFN in, FFN out) run as PyTorch's dynamic-quantized linear on fbgemm
(`torch.ops.quantized.linear_dynamic`, weights quantized once to int8 and prepacked, symmetric
per output channel by default; activations quantized per tensor at each call with the range of
that call, 7-bit (reduce_range) so AVX2's u8 x s8 pair sums cannot saturate int16). Everything
else stays fp32 and forkattn's: the fused attention kernel (padded with a key-padding mask, or
unpadded/varlen), the fused C++ epilogues (bias + residual + LayerNorm, bias + erf-GELU), the
embeddings and the pooler. transformers' BERT-family models get torch.ao's `quantize_dynamic` on
their encoder's Linear layers with the same per-channel scheme (their attention is untouched:
whatever attn_implementation they use, forkattn's included).

precision="bf16" (forkattn's BERT family): the encoder layers' weights and activations in
bfloat16 (half the weight memory), run through the layers' ordinary path (ATen bf16 GEMMs,
forkattn's attention in bf16); the embeddings and pooler stay fp32, and the encoder's output is
returned in fp32. On CPUs without native bf16 (oneDNN reports none: AVX2-only machines like this
project's) the GEMMs are converted/emulated and measured ~6x SLOWER than fp32; kept for its
memory and as an accuracy reference, with a warning on such CPUs (docs/CPU_QUANT.md).

The quantized model is inference-only: `train()` and autograd raise (int8 GEMMs have no gradient;
the fp32 weights are gone). Quantize a model after loading its checkpoint; save the fp32 one.
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forkattn

from .. import _native
from .backend import attention_backend

PRECISIONS = ("int8", "bf16")
REDUCE_RANGE = True  # 7-bit activations: fbgemm's AVX2 kernels sum u8*s8 pairs in int16 (vpmaddubsw)


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for e in ("fbgemm", "x86", "onednn", "qnnpack"):
        if e in engines:
            return e
    raise RuntimeError(f"this PyTorch has no quantized engine (supported_engines {engines}): int8 is unavailable")


def quantize_weight(w: Tensor, per_channel: bool = True):
    """w [out, in] fp32 -> a qint8 tensor, symmetric (zero point 0): scale max|w| / 127 per output
    channel (per_channel) or over the whole tensor. Each weight's error is at most scale / 2."""
    w = w.detach().float().contiguous()
    amax = w.abs().amax(1) if per_channel else w.abs().amax().expand(w.shape[0])
    scale = (amax / 127).clamp_min(1e-12).double()  # an all-zero row keeps a usable scale
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
        if per_channel:
            return torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.quantize_per_tensor(w, float(scale[0]), 0, torch.qint8)


def _prepack(w: Tensor, bias: Optional[Tensor], per_channel: bool):
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = _engine()
    try:
        return torch.ops.quantized.linear_prepack(quantize_weight(w, per_channel),
                                                  None if bias is None else bias.detach().float().contiguous())
    finally:
        torch.backends.quantized.engine = prev


def int8_linear(x: Tensor, packed) -> Tensor:
    """x [..., in] fp32 @ the prepacked int8 weight^T (+ its bias): fbgemm's dynamic int8 GEMM."""
    return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)


def _inference_only(module: nn.Module, mode: bool) -> None:
    if mode:
        raise RuntimeError(f"{type(module).__name__} is inference-only (quantize_for_cpu): train(True) is "
                           "not supported; train the fp32 model and quantize it afterwards")


GEMMS = ("qkv", "attn_out", "inter", "out")  # an Int8BertLayer's four GEMMs, in forward order


class Int8BertLayer(nn.Module):
    """A forkattn BertLayer with its four GEMMs in int8 (module docstring); same forward signature.

    Built in one of two states. Packed (the default): every GEMM runs fbgemm's int8 kernel.
    Calibrating (`calibrate=True`, what quantize_for_cpu does when given calibration batches): the
    GEMMs still run in fp32 and record each input channel's largest |x|; `pack()` then splits off
    the channels above `outlier_threshold` (the decomposition of LLM.int8(), Dettmers et al. 2022):
    x W^T = (x * keep) W_q^T + x[:, out] W[:, out]^T, the first in int8, the second a thin fp32
    GEMM, so the per-tensor activation scale is no longer set by a few outlier channels (BERT's
    LayerNorm outputs reach 28 where the mean |x| is 0.4). SmoothQuant-style scaling was tried
    first and measured worse here (docs/CPU_QUANT.md). At run time: one multiply by the 0/1 mask,
    one column gather and the thin GEMM per split GEMM."""

    def __init__(self, layer: nn.Module, per_channel: bool = True, calibrate: bool = False,
                 outlier_threshold: Optional[float] = 3.0):
        super().__init__()
        s, att_out, out = layer.attention.self, layer.attention.output, layer.output
        d = lambda t: t.detach().float().clone()  # noqa: E731
        # the QKV bias stays inside its GEMM (nothing to fuse it with); the other three join the
        # fused epilogue after their GEMM
        self._fp32 = {"qkv": (d(torch.cat([s.query.weight, s.key.weight, s.value.weight])),
                              d(torch.cat([s.query.bias, s.key.bias, s.value.bias]))),
                      "attn_out": (d(att_out.dense.weight), None), "inter": (d(layer.intermediate.dense.weight), None),
                      "out": (d(out.dense.weight), None)}
        self._amax = {n: None for n in GEMMS}
        self._packed, self._outliers = {}, {}
        self.attn_out_bias = nn.Parameter(d(att_out.dense.bias), requires_grad=False)
        self.inter_bias = nn.Parameter(d(layer.intermediate.dense.bias), requires_grad=False)
        self.out_bias = nn.Parameter(d(out.dense.bias), requires_grad=False)
        self.attn_norm, self.out_norm = att_out.LayerNorm, out.LayerNorm
        self.act, self.num_heads, self.config, self.per_channel = layer.act, layer.num_heads, layer.config, per_channel
        self.outlier_threshold = outlier_threshold
        self.requires_grad_(False)
        self.eval()
        if not calibrate:
            self.pack()

    @property
    def calibrating(self) -> bool:
        return not self._packed

    def pack(self) -> None:
        """Quantize and prepack the four weights (with the outlier split when calibration recorded
        inputs); the fp32 weights are released."""
        for n in GEMMS:
            w, b = self._fp32[n]
            amax = self._amax[n]
            if amax is not None and self.outlier_threshold is not None:
                idx = (amax > self.outlier_threshold).nonzero().flatten()
                if idx.numel():
                    keep = torch.ones(w.shape[1])
                    keep[idx] = 0
                    self._outliers[n] = (idx, w[:, idx].contiguous(), keep)
                    w = w * keep  # those columns come from the fp32 GEMM
            self._packed[n] = _prepack(w, b, self.per_channel)
        self._fp32 = {}

    def _gemm(self, name: str, x: Tensor) -> Tensor:
        if self.calibrating:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            self._amax[name] = m if self._amax[name] is None else torch.maximum(self._amax[name], m)
            return F.linear(x, *self._fp32[name])
        split = self._outliers.get(name)
        if split is None:
            return int8_linear(x, self._packed[name])
        idx, w_out, keep = split
        y = int8_linear(x * keep, self._packed[name])
        return y.add_(F.linear(x.index_select(-1, idx), w_out))

    def train(self, mode: bool = True):
        _inference_only(self, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"int8 fbgemm dynamic, {'per-channel' if self.per_channel else 'per-tensor'} weights, "
                f"{sum(len(v[0]) for v in self._outliers.values())} outlier input channels in fp32, heads={self.num_heads}"
                + (", calibrating" if self.calibrating else ""))

    def _bias_residual_norm(self, h: Tensor, residual: Tensor, bias: Tensor, norm: nn.LayerNorm) -> Tensor:
        if _native._C is not None:
            _native._C.bias_residual_layernorm_cpu(h, residual, bias, norm.weight, norm.bias, norm.eps)
            return h
        return norm(h + bias + residual)

    def _bias_act(self, a: Tensor) -> Tensor:
        if _native._C is not None and self.config.hidden_act == "gelu":
            _native._C.bias_gelu_cpu(a, self.inter_bias)
            return a
        return self.act(a + self.inter_bias)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], packing=None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("input x requires grad: a quantize_for_cpu model has no gradients (int8 GEMMs); "
                               "run it under torch.inference_mode() or torch.no_grad()")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"input x must be a float32 CPU tensor for the int8 layers, got {x.dtype} on {x.device}")
        x = x.contiguous()
        backend = attention_backend(self.config)
        qkv = self._gemm("qkv", x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        if packing is None:
            B, L, H = x.shape
            q, k, v = (t.transpose(1, 2) for t in qkv)  # [B, heads, L, head_dim] views, read in place
            y = forkattn.attention(q, k, v, key_padding_mask=key_padding_mask, backend=backend)
            y = y.transpose(1, 2).reshape(B, L, H)
        else:
            y = forkattn.attention_varlen(*qkv, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                          packing.max_seqlen, backend=backend, validate_seqlens=False).flatten(1)
        h = self._bias_residual_norm(self._gemm("attn_out", y.contiguous()), x, self.attn_out_bias,
                                     self.attn_norm)
        a = self._bias_act(self._gemm("inter", h))
        return self._bias_residual_norm(self._gemm("out", a), h, self.out_bias, self.out_norm)


class Bf16Encoder(nn.Module):
    """A forkattn BertEncoder run in bfloat16: fp32 in, fp32 out (module docstring)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.inner = encoder.to(torch.bfloat16)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        _inference_only(self, mode)
        return super().train(mode)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], packing=None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("input x requires grad: a quantize_for_cpu model has no gradients; "
                               "run it under torch.inference_mode() or torch.no_grad()")
        return self.inner(x.to(torch.bfloat16), key_padding_mask, packing).float()


def _encoders(model: nn.Module):
    from .bert import BertEncoder

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, BertEncoder)]


def _is_hf(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel)


def _check(model, precision, per_channel) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a forkattn or transformers BERT-family model), "
                        f"got {type(model).__name__}")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (fp32 is the model as it is), got {precision!r}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {type(per_channel).__name__}")
    if getattr(model, "quantized_precision", None) is not None:
        raise ValueError(f"model is already quantized ({model.quantized_precision}); quantize the fp32 model")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type != "cpu":
            raise ValueError(f"model must be on the CPU, but {name} is on {p.device}")
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(f"model must be float32, but {name} is {p.dtype}")


def _quantize_hf(model: nn.Module, precision: str, per_channel: bool) -> None:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    if precision != "int8":
        raise ValueError(f"precision {precision!r} is available for forkattn's BERT models only; "
                         "transformers models take precision='int8'")
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    encoder = getattr(base, "encoder", None)
    if encoder is None:
        raise TypeError(f"model must be a BERT-family model with an .encoder, got {type(model).__name__}")
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = _engine()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            quantize_dynamic(encoder, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    finally:
        torch.backends.quantized.engine = prev


def _is_cache_entry(v) -> bool:
    """An entry of cpu_inference.cached (the fp32 fast path's packed weights): (((tensor, version), ...), built)."""
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], tuple)
            and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], Tensor) for e in v[0]))


def _copy_without_caches(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model) minus the fp32 fast path's caches (oneDNN-packed weights are opaque
    tensors that cannot be copied; the copy's fp32 modules rebuild them if they ever run)."""
    memo = {}
    for mod in model.modules():
        for v in mod.__dict__.values():
            if _is_cache_entry(v):
                memo[id(v)] = None
    return copy.deepcopy(model, memo)  # a skipped entry becomes None there: cached() rebuilds it


def _refuse_train(self, mode: bool = True):
    _inference_only(self, mode)
    return nn.Module.train(self, mode)


def _calibration_batches(calibration) -> List[dict]:
    batches = [calibration] if isinstance(calibration, dict) else list(calibration)
    if not batches or not all(isinstance(b, dict) and "input_ids" in b for b in batches):
        raise TypeError("calibration must be a dict of model inputs (input_ids, attention_mask, ...: a tokenizer's "
                        "output) or a non-empty list of them")
    return batches


def quantize_for_cpu(model: nn.Module, precision: str, *, calibration=None, per_channel: bool = True,
                     outlier_threshold: float = 3.0, inplace: bool = False, accept_inexact: bool = False) -> nn.Module:
    """An inference-only copy of `model` (a forkattn BERT-family model, or a transformers one for
    int8) whose encoder runs in `precision` ("int8" or "bf16"; module docstring). The input model
    must be fp32 on the CPU; it is left unchanged unless inplace=True.

    int8 only: `calibration`, a batch of model inputs (a dict such as a tokenizer's output) or a
    list of them, turns on the outlier split (Int8BertLayer): GEMM input channels whose largest
    |x| on those batches exceeds `outlier_threshold` are computed in fp32, the rest in int8.
    Without calibration every channel is int8: docs/CPU_QUANT.md measures both (neither passes
    its accuracy bar; calibrated is much closer). per_channel: weight scales per output channel
    (default) or one per tensor.

    int8 fails the accuracy bar of docs/CPU_QUANT.md, so it runs only with accept_inexact=True
    (the caller says a task-level check on their own data accepts its error); without it a
    ValueError says why. bf16 passes the bar and needs no such flag.

    The result is in eval mode with no parameter requiring grad; `model.train()` on it raises;
    `quantized_precision` says what it is."""
    _check(model, precision, per_channel)
    if not isinstance(accept_inexact, bool):
        raise TypeError(f"accept_inexact must be a bool, got {type(accept_inexact).__name__}")
    if precision == "int8" and not accept_inexact:
        raise ValueError("precision='int8' is below forkattn's accuracy bar (all-MiniLM-L6-v2 embeddings vs fp32: "
                         "cosine min 0.981 calibrated, 0.886 without; docs/CPU_QUANT.md); pass accept_inexact=True "
                         "to use it after checking its error on your own task, or use precision='bf16'")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if isinstance(outlier_threshold, bool) or not isinstance(outlier_threshold, (int, float)) or not outlier_threshold > 0:
        raise ValueError(f"outlier_threshold must be a number > 0, got {outlier_threshold!r}")
    if calibration is not None:
        if precision != "int8" or _is_hf(model):
            raise ValueError("calibration applies to precision='int8' on forkattn's BERT models only, "
                             f"got precision={precision!r} for {type(model).__name__}")
        calibration = _calibration_batches(calibration)
    hf = _is_hf(model)
    encoders = [] if hf else _encoders(model)
    if not hf and not encoders:
        raise TypeError(f"model must be a forkattn BERT-family model (forkattn.models.bert) or a transformers "
                        f"BERT-family model, got {type(model).__name__} (no BertEncoder inside)")
    m = model if inplace else _copy_without_caches(model)
    m.eval().requires_grad_(False)
    if hf:
        _quantize_hf(m, precision, per_channel)
    elif precision == "int8":
        for _, _, enc in _encoders(m):
            done = {}  # ALBERT-style shared layers stay shared
            for i, layer in enumerate(enc.layer):
                if id(layer) not in done:
                    done[id(layer)] = Int8BertLayer(layer, per_channel, calibrate=calibration is not None,
                                                    outlier_threshold=float(outlier_threshold))
                enc.layer[i] = done[id(layer)]
        if calibration is not None:
            with torch.inference_mode():
                for batch in calibration:
                    m(**batch)
            for layer in {id(x): x for x in m.modules() if isinstance(x, Int8BertLayer)}.values():
                layer.pack()
    else:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn("this CPU has no native bf16 (oneDNN reports none): bf16 GEMMs are emulated and were "
                          "measured ~6x slower than fp32 on an AVX2 machine; int8 is faster and smaller "
                          "(docs/CPU_QUANT.md)", RuntimeWarning, stacklevel=2)
        for parent, name, enc in _encoders(m):
            setattr(parent, name, Bf16Encoder(enc))
    m.quantized_precision = precision
    # refuse train() on the whole model, not only inside the quantized children
    m.train = _refuse_train.__get__(m)
    return m
