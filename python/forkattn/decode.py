"""forkattn.decode: a KV cache with in-place append, and decode attention over it.

GPT generation reads the whole cache for every new token, so decode attention is memory-bound.
Two op families, each dispatched through forkattn.backends:

- "kv_append" (custom op forkattn::kv_append, mutates the cache tensors and seqlens): writes the
  T new tokens of every sequence at its own position, in one kernel per backend.
- "decode_attention" (custom op forkattn::decode_attention): the T new queries of each sequence
  attend causally (bottom-right) to each other and to every earlier token of their sequence.
  The cuda and triton backends split the KV sequence into chunks processed by separate
  programs and merge the (out, log-sum-exp) partials (Flash-Decoding); the split count comes
  from a heuristic on SM count, batch x kv-heads and max_seqlen, fixed per (cache, heads,
  tokens) by a plan that preallocates the workspace, so the launch grid never changes and the
  calls are CUDA-graph capturable. The chunk boundaries are computed on the device from
  seqlens, so a plan stays valid as the sequences grow.

Storage: contiguous k_cache/v_cache [B, Hkv, max_seqlen, D], or paged [num_pages, Hkv,
page_size, D] with an int32 block_table [B, pages_per_seq] (page index per logical page, -1 =
none; the vLLM/FlashInfer convention). Kernels see both as "pages": a contiguous cache is the
paged layout with page_size = max_seqlen and page b for sequence b (block_table None). No backend
ever dereferences an entry outside [0, num_pages): the cpu entry points refuse it (ValueError),
check=True refuses it on the host for every backend, and the cuda/triton/eager kernels skip it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import resolve_scale
from ._custom_op import direct_call_ok
from ._layout import FLOAT_DTYPES

MAX_NEW_TOKENS = 16  # decode_attention's T; append takes any T
MAX_HEAD_DIM_CPU = backends.cpu.MAX_HEAD_DIM
MAX_SPLITS = 64

DECODE_BACKENDS = backends.get("decode_attention")
APPEND_BACKENDS = backends.get("kv_append")


class KVCacheOverflowError(ValueError):
    """An append would pass max_seqlen or need a page the block table does not have; nothing was written."""


# --- the custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("forkattn::kv_append", mutates_args=("k_cache", "v_cache", "seqlens"))
def kv_append(
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    block_table: Optional[Tensor],
    k: Tensor,
    v: Tensor,
    max_seqlen: int,
    backend: str,
) -> None:
    """Writes k, v [B, Hkv, T, D] at positions seqlens[b] + t and advances seqlens. Tokens that do not
    fit (position >= max_seqlen, or a page entry < 0) are not written and seqlens stops before them;
    the checked path of KVCache.append refuses such calls before this op runs."""
    APPEND_BACKENDS.impl(backend)(k_cache, v_cache, seqlens, block_table, k, v, max_seqlen)


@kv_append.register_fake
def _(k_cache, v_cache, seqlens, block_table, k, v, max_seqlen, backend):
    return None


@torch.library.custom_op("forkattn::decode_attention", mutates_args=("o_partial", "lse_partial"))
def decode_attention_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    block_table: Optional[Tensor],
    o_partial: Tensor,
    lse_partial: Tensor,
    max_seqlen: int,
    num_splits: int,
    scale: float,
    backend: str,
) -> Tensor:
    """out [B, H, T, D] (memory [B, T, H, D]). o_partial float32 [num_splits, B, H, T, D] and
    lse_partial float32 [num_splits, B, H, T] are the split-KV workspace (unused, may be empty, when
    num_splits == 1 or the backend does not split)."""
    return DECODE_BACKENDS.impl(backend)(q, k_cache, v_cache, seqlens, block_table, o_partial, lse_partial,
                                         max_seqlen, num_splits, scale)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, seqlens, block_table, o_partial, lse_partial, max_seqlen, num_splits, scale, backend):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


# --- split heuristic (shared by cuda and triton) -------------------------------------------------

def num_splits_heuristic(num_sms: int, batch: int, kv_heads: int, row_blocks: int, max_seqlen: int) -> int:
    """How many chunks to cut each sequence into. Without splitting there are batch x kv_heads x
    row_blocks programs; aim for about 4 per SM (so B=1 at 32k context still fills the GPU) while
    keeping each chunk at least 256 keys long, so the merge of partials stays cheap."""
    base = batch * kv_heads * row_blocks
    want = -(-4 * num_sms // base)
    by_len = max(1, max_seqlen // 256)
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # Triton's interpreter: small, but enough to exercise the split + merge path


# --- the cache ------------------------------------------------------------------------------------

def seqlens_error(b: int, value: int) -> str:
    # the same text as csrc/decode.cpp's check_cache_state_cpu
    return f"seqlens[{b}] = {value} is negative (a sequence's length is at least 0)"


def block_table_error(b: int, j: int, value: int, num_pages: int) -> str:
    # the same text as csrc/decode.cpp's check_cache_state_cpu
    return (f"block_table[{b}, {j}] = {value}: row {b} names page {value}, outside the pool [0, num_pages={num_pages}) "
            f"(an entry is a page index, or negative for no page)")


def _check_int(name: str, x, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"{name} must be at least {lo}, got {x}")
    return x


class KVCache:
    """Static KV-cache buffers updated in place, contiguous or paged.

    KVCache(batch_size, num_kv_heads, max_seqlen, head_dim, *, dtype, device, page_size=None,
    num_pages=None, check=True)

    Contiguous (page_size None): k_cache, v_cache [B, Hkv, max_seqlen, D]. Paged: k_cache, v_cache
    [num_pages, Hkv, page_size, D] and block_table int32 [B, ceil(max_seqlen / page_size)] (page index
    of each logical page, -1 = none; default: page i of sequence b is i * B + b when that is below
    num_pages, which defaults to enough pages for every sequence). block_table may be rewritten in
    place by a page allocator. seqlens: int32 [B] on the device, the tokens stored per sequence.

    append(k, v): k, v [B, Hkv, T, D] are written at positions seqlens[b] .. seqlens[b] + T - 1 of each
    sequence, in place, in one kernel, and seqlens advances by T.
    Checks: with check=True (default) append and decode_attention first validate the cache on the
    host (validate()): a negative length in seqlens, or a block_table entry >= num_pages, raises
    ValueError naming it (row and value), and an append that would pass max_seqlen or need a missing
    page (-1) raises KVCacheOverflowError; a refused call writes nothing. The check SYNCS WITH THE
    HOST (one .tolist() of a few device reductions), so it cannot be captured in a CUDA graph. With
    check=False there is no sync and the kernels clamp instead: tokens that do not fit are dropped and
    seqlens stops at the capacity; a negative length writes nothing and reads as 0; a page entry
    outside [0, num_pages) is never dereferenced by any backend (an append stops before it, decode
    gives its tokens no weight), so nothing is ever read or written outside the pools. The cpu
    backend (and forkattn._C's entry points) validate lengths and entries on their own whatever
    check says: on the CPU that costs no sync.
    reset(batch_index=None): sets seqlens of all (or the given) sequences to 0 (the data stays).
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_seqlen: int, head_dim: int, *, dtype,
                 device, page_size: Optional[int] = None, num_pages: Optional[int] = None, check: bool = True):
        self.batch_size = _check_int("batch_size", batch_size)
        self.num_kv_heads = _check_int("num_kv_heads", num_kv_heads)
        self.max_seqlen = _check_int("max_seqlen", max_seqlen)
        self.head_dim = _check_int("head_dim", head_dim)
        if self.head_dim > MAX_HEAD_DIM_CPU:
            raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM_CPU}, got {head_dim}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {type(check).__name__}")
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "meta":
            # append and decode write and read the cache's values (and check=True reads seqlens on
            # the host), none of which a meta tensor has; refuse here rather than fail at first use
            raise ValueError("device must be a real device (cpu, cuda) holding the cache's storage, got meta; "
                             "for shapes only, trace decode_attention and append under torch.compile / "
                             "FakeTensorMode with a cache on a real device")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.check = check
        B, Hkv, S, D = self.batch_size, self.num_kv_heads, self.max_seqlen, self.head_dim
        if page_size is None:
            if num_pages is not None:
                raise ValueError("num_pages needs page_size (a paged cache); got page_size=None")
            self.paged, self.page_size, self.num_pages, self.block_table = False, None, None, None
            shape = (B, Hkv, S, D)
        else:
            self.page_size = _check_int("page_size", page_size)
            pages_per_seq = -(-S // self.page_size)
            self.num_pages = B * pages_per_seq if num_pages is None else _check_int("num_pages", num_pages)
            self.paged = True
            ids = torch.arange(pages_per_seq, dtype=torch.int64)[None, :] * B + torch.arange(B)[:, None]
            ids = torch.where(ids < self.num_pages, ids, torch.full_like(ids, -1))
            self.block_table = ids.to(device=self.device, dtype=torch.int32).contiguous()
            shape = (self.num_pages, Hkv, self.page_size, D)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)
        # Host-side upper bound of max(seqlens), kept without syncing (the eager backend slices the
        # cache to it); if you write seqlens yourself, raise this to at least its new maximum.
        self.seqlen_bound = 0
        self._plans: Dict[Tuple, Tuple[int, Tensor, Tensor]] = {}
        self._features = ("paged",) if self.paged else ()  # what resolve is told about calls on this cache
        self._features_gqa = self._features + ("gqa",)

    def __repr__(self) -> str:
        kind = f"paged page_size={self.page_size} num_pages={self.num_pages}" if self.paged else "contiguous"
        return (f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, max_seqlen="
                f"{self.max_seqlen}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, {kind})")

    def capacity(self) -> Tensor:
        """int32 [B] on the device: how many tokens each sequence can hold (max_seqlen, or fewer when
        its block table runs out of pages)."""
        if not self.paged:
            return torch.full_like(self.seqlens, self.max_seqlen)
        usable = (self.block_table >= 0) & (self.block_table < self.num_pages)
        leading = usable.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
        return torch.clamp(leading * self.page_size, max=self.max_seqlen).to(torch.int32)

    def _check_kv(self, k, v) -> int:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [batch, kv_heads, new_tokens, head_dim], got shape {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {t.device}")
            want = (self.batch_size, self.num_kv_heads, t.shape[2], self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [batch, kv_heads, new_tokens, head_dim] = "
                                 f"[{self.batch_size}, {self.num_kv_heads}, T, {self.head_dim}], got {tuple(t.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        T = k.shape[2]
        if T < 1:
            raise ValueError(f"k and v must hold at least one new token (dim 2), got {T}")
        return T

    def append(self, k: Tensor, v: Tensor, *, backend: Optional[str] = None, check: Optional[bool] = None) -> None:
        """Write k, v [B, Hkv, T, D] after each sequence's last token, in place, and advance seqlens by T.
        check (default self.check): True raises KVCacheOverflowError when a sequence would not fit,
        and ValueError on a negative length or a block_table entry outside the pool (writing nothing),
        at the cost of one host sync; False never syncs and clamps (see the class doc)."""
        T = self._check_kv(k, v)
        check = self.check if check is None else check
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool or None, got {type(check).__name__}")
        b = APPEND_BACKENDS.resolve(backend, self.device.type, self.dtype, self.head_dim, self._features)
        if check:
            self.validate(new_tokens=T)
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        args = (self.k_cache, self.v_cache, self.seqlens, self.block_table, k, v, self.max_seqlen)
        if direct_call_ok(*args[:6]):
            b.impl(*args)
            torch.autograd.graph.increment_version([self.k_cache, self.v_cache, self.seqlens])  # as the op does
        else:
            kv_append(*args, b.NAME)
        self.seqlen_bound = min(self.max_seqlen, self.seqlen_bound + T)

    def validate(self, new_tokens: int = 0) -> None:
        """The host-side check of check=True (ONE HOST SYNC): raises ValueError when a length in
        seqlens is negative or a block_table entry names a page outside the pool (>= num_pages; an
        entry is a page index or negative for none), and, when new_tokens > 0, KVCacheOverflowError
        when an append of that many tokens would not fit. append and decode_attention call it
        before running anything, so a refused call writes nothing."""
        lens = self.seqlens.to(torch.int64)
        flags = [lens.min() < 0]
        if self.paged:
            flags.append((self.block_table >= self.num_pages).any())
        if new_tokens:
            over = (lens + new_tokens) > self.capacity()
            flags.append(over.any())
        flags = torch.stack(flags).tolist()
        suffix = "; nothing was written" if new_tokens else ""
        if flags.pop(0):
            b = int((lens < 0).nonzero()[0, 0])
            raise ValueError(seqlens_error(b, int(lens[b])) + suffix)
        if self.paged and flags.pop(0):
            b, j = ((self.block_table >= self.num_pages).nonzero()[0]).tolist()
            raise ValueError(block_table_error(b, j, int(self.block_table[b, j]), self.num_pages) + suffix)
        if new_tokens and flags.pop(0):
            bad = over.nonzero().flatten().tolist()
            lens = self.seqlens[bad].tolist()
            caps = self.capacity()[bad].tolist()
            raise KVCacheOverflowError(
                f"append of {new_tokens} tokens would overflow sequences {bad[:8]} (lengths {lens[:8]}, capacity "
                f"{caps[:8]}: max_seqlen={self.max_seqlen}"
                + (f", page_size={self.page_size}, pages without an entry in block_table" if self.paged else "")
                + "); nothing was written"
            )

    def reset(self, batch_index=None) -> None:
        """Empty all sequences (batch_index None) or the given ones (an int, a list of ints or a 1-D
        integer tensor). Only seqlens changes; the stored values are simply overwritten later."""
        if batch_index is None:
            self.seqlens.zero_()
            self.seqlen_bound = 0
            return
        if isinstance(batch_index, bool):
            raise TypeError("batch_index must be None, an int, a list of ints or an integer tensor, got bool")
        if isinstance(batch_index, int):
            idx = [batch_index]
        elif isinstance(batch_index, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in batch_index):
                raise TypeError(f"batch_index must hold ints, got {batch_index!r}")
            idx = list(batch_index)
        elif isinstance(batch_index, Tensor):
            if batch_index.dtype not in (torch.int32, torch.int64) or batch_index.dim() > 1:
                raise TypeError(f"batch_index tensor must be 0-D or 1-D int32/int64, got {batch_index.dtype} "
                                f"{tuple(batch_index.shape)}")
            self.seqlens.index_fill_(0, batch_index.flatten().to(device=self.device, dtype=torch.int64), 0)
            return
        else:
            raise TypeError(f"batch_index must be None, an int, a list of ints or an integer tensor, got "
                            f"{type(batch_index).__name__}")
        for i in idx:
            if not -self.batch_size <= i < self.batch_size:
                raise IndexError(f"batch_index {i} is out of range for batch_size {self.batch_size}")
        self.seqlens[torch.tensor(idx, dtype=torch.int64, device=self.device)] = 0

    def plan(self, num_heads: int, num_new_tokens: int, backend: Optional[str] = None, *,
             num_splits: Optional[int] = None) -> Tuple[int, Tensor, Tensor]:
        """Choose the split count for decode_attention with these q sizes (num_heads, num_new_tokens)
        and preallocate its workspace; returns (num_splits, o_partial, lse_partial). decode_attention
        plans on its first call by itself; call this before capturing a CUDA graph, or to override
        the heuristic's split count (num_splits, for tuning and tests; only cuda and triton split)."""
        _check_int("num_heads", num_heads)
        _check_int("num_new_tokens", num_new_tokens)
        if num_splits is not None:
            _check_int("num_splits", num_splits)
            if num_splits > MAX_SPLITS:
                raise ValueError(f"num_splits must be at most {MAX_SPLITS}, got {num_splits}")
        features = self._features + (("gqa",) if num_heads != self.num_kv_heads else ())
        b = DECODE_BACKENDS.resolve(backend, self.device.type, self.dtype, self.head_dim, features)
        if num_splits is not None:
            self._plans.pop((num_heads, num_new_tokens, b.NAME), None)
        return self._plan(num_heads, num_new_tokens, b, num_splits)

    def _plan(self, H: int, T: int, backend, num_splits: Optional[int] = None) -> Tuple[int, Tensor, Tensor]:
        key = (H, T, backend.NAME)
        plan = self._plans.get(key)
        if plan is None:
            splits = 1
            if backend.SPLITS_KV:
                group = H // self.num_kv_heads
                row_blocks = -(-(group * T) // backend.rows_per_program())
                splits = num_splits or num_splits_heuristic(_num_sms(self.device), self.batch_size,
                                                            self.num_kv_heads, row_blocks, self.max_seqlen)
            n = splits if splits > 1 else 0
            o_ws = torch.empty((n, self.batch_size, H, T, self.head_dim), dtype=torch.float32, device=self.device)
            lse_ws = torch.empty((n, self.batch_size, H, T), dtype=torch.float32, device=self.device)
            plan = self._plans[key] = (splits, o_ws, lse_ws)
        return plan


# --- public API -------------------------------------------------------------------------------------

def check_decode_inputs(q, cache, scale) -> float:
    """Checks q against the cache; returns the softmax scale as a float (see _checks.resolve_scale)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a forkattn.KVCache, got {type(cache).__name__}")
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [batch, heads, new_tokens, head_dim], got shape {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
    B, H, T, D = q.shape
    if B != cache.batch_size:
        raise ValueError(f"q.shape[0] (batch) must be the cache's batch_size {cache.batch_size}, got {B}")
    if D != cache.head_dim:
        raise ValueError(f"q.shape[3] (head_dim) must be the cache's head_dim {cache.head_dim}, got {D}")
    if H < 1 or H % cache.num_kv_heads != 0:
        raise ValueError(f"q.shape[1] (heads) must be a positive multiple of the cache's num_kv_heads "
                         f"{cache.num_kv_heads} (GQA/MQA), got {H}")
    if not 1 <= T <= MAX_NEW_TOKENS:
        raise ValueError(f"q.shape[2] (new tokens) must be in [1, {MAX_NEW_TOKENS}], got {T}")
    return resolve_scale(scale, D)




def decode_attention(q: Tensor, cache: KVCache, *, scale: Optional[float] = None, backend: Optional[str] = None,
                     check: Optional[bool] = None) -> Tensor:
    """Attention of the T newest tokens of each sequence over its cached context.

    q [B, H, T, D], 1 <= T <= 16: the queries of the T tokens most recently appended to `cache`
    (append first, then call this). Query t of sequence b sees keys j <= seqlens[b] - T + t (causal,
    bottom-right aligned); lengths may differ across the batch (a row that sees no key gives zeros).
    H may be a multiple of the cache's num_kv_heads (GQA/MQA). scale defaults to head_dim ** -0.5.
    backend: None picks the fastest for the device/dtype/head_dim, or "cpu", "cuda", "triton", "eager".
    Returns [B, H, T, D] with [B, T, H, D] memory (out.transpose(1, 2).reshape(B, T, H * D) is a view).
    check (default cache.check): True validates the cache's state first (KVCache.validate: a negative
    length or a block_table entry outside [0, num_pages) raises ValueError), which SYNCS WITH THE HOST
    on a GPU; False never syncs, so the call can be captured in a CUDA graph (plan first:
    KVCache.plan), and the cuda/triton/eager kernels then give a page outside the pool no weight and
    treat a negative length as 0. The cpu backend always validates (in C++, no sync to avoid).
    """
    scale = check_decode_inputs(q, cache, scale)
    check = cache.check if check is None else check
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool or None, got {type(check).__name__}")
    B, H, T, D = q.shape
    features = cache._features_gqa if H != cache.num_kv_heads else cache._features
    b = DECODE_BACKENDS.resolve(backend, q.device.type, q.dtype, D, features)
    if check and not b.CHECKS_CACHE:  # such an entry point checks the same on its own
        cache.validate()
    if q.stride(-1) != 1:
        q = q.contiguous()
    splits, o_ws, lse_ws = cache._plan(H, T, b)
    # The kernels read each sequence up to its own length (clamped to max_seqlen); the eager
    # baseline multiplies over one padded slice, as long as the host-side bound on the lengths.
    kv_len = max(1, min(cache.max_seqlen, cache.seqlen_bound)) if b.HOST_LENGTH_BOUND else cache.max_seqlen
    args = (q, cache.k_cache, cache.v_cache, cache.seqlens, cache.block_table, o_ws, lse_ws, kv_len, splits, scale)
    if direct_call_ok(*args[:7]):
        return b.impl(*args)
    return decode_attention_op(*args, b.NAME)
