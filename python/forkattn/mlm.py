"""forkattn.mlm: BERT's masked-language-model sampler (80/10/10) as one fused kernel per call.

Backends (forkattn/backends/) "cpu" (C++), "cuda" (kernels/mlm) and "triton" give bit-identical outputs for the same
seed: every random decision comes from Philox4x32-10 keyed by the 64-bit seed, with the counter
layout documented in kernels/mlm/params.h. "eager" is forkattn.reference.mlm_mask, the way
transformers' DataCollatorForLanguageModeling does it (clone, three torch.bernoulli draws,
torch.randint, boolean-index writes): statistically the same sampler, not the same random stream.

The kernel backends follow backends.families.MLMBackend's contract, called through the custom ops
forkattn::mlm_mask (fresh outputs) and forkattn::mlm_mask_ (writes into input_ids).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._custom_op import direct_call_ok

MAX_SPECIAL_IDS = 64  # kernels/mlm/params.h kMaxSpecial
IGNORE_INDEX = -100
_TWO32 = 1 << 32

BACKENDS = backends.get("mlm_mask")


# --- the custom ops ---------------------------------------------------------------------------------

def _new_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("forkattn::mlm_mask", mutates_args=())
def mlm_mask_op(
    input_ids: Tensor,
    special_tokens_mask: Optional[Tensor],
    attention_mask: Optional[Tensor],
    labels: Optional[Tensor],
    word_ids: Optional[Tensor],
    special_ids: List[int],
    excluded_ids: List[int],
    vocab_size: int,
    mask_token_id: int,
    seed: int,
    t_select: int,
    t_mask: int,
    t_random: int,
    n_random: int,
    exact: bool,
    min_masked: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(masked_input_ids, labels), both new contiguous tensors of input_ids' dtype. Integer outputs:
    not differentiable. seed is the 64-bit Philox seed as a signed int64."""
    out, lab = _new_like(input_ids), _new_like(input_ids)
    BACKENDS.impl(backend)(input_ids, out, lab, special_tokens_mask, attention_mask, labels, word_ids,
                           special_ids, excluded_ids, vocab_size, mask_token_id, seed, t_select, t_mask,
                           t_random, n_random, exact, min_masked)
    return out, lab


@mlm_mask_op.register_fake
def _(input_ids, *args):
    return _new_like(input_ids), _new_like(input_ids)


@torch.library.custom_op("forkattn::mlm_mask_", mutates_args=("input_ids",))
def mlm_mask_inplace_op(
    input_ids: Tensor,
    special_tokens_mask: Optional[Tensor],
    attention_mask: Optional[Tensor],
    labels: Optional[Tensor],
    word_ids: Optional[Tensor],
    special_ids: List[int],
    excluded_ids: List[int],
    vocab_size: int,
    mask_token_id: int,
    seed: int,
    t_select: int,
    t_mask: int,
    t_random: int,
    n_random: int,
    exact: bool,
    min_masked: int,
    backend: str,
) -> Tensor:
    """Masks input_ids in place (each token is read before it is written); returns the labels."""
    lab = _new_like(input_ids)
    BACKENDS.impl(backend)(input_ids, input_ids, lab, special_tokens_mask, attention_mask, labels, word_ids,
                           special_ids, excluded_ids, vocab_size, mask_token_id, seed, t_select, t_mask,
                           t_random, n_random, exact, min_masked)
    return lab


@mlm_mask_inplace_op.register_fake
def _(input_ids, *args):
    return _new_like(input_ids)


# --- argument checks ----------------------------------------------------------------------------------

def _check_prob(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_int(name: str, v, lo: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_like(name: str, t, input_ids: Tensor, dtypes, what: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    if tuple(t.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    if t.device != input_ids.device:
        raise ValueError(f"{name} must be on input_ids' device {input_ids.device}, got {t.device}")


def _special_list(special_token_ids, vocab_size: int) -> List[int]:
    if special_token_ids is None:
        return []
    if isinstance(special_token_ids, Tensor):
        special_token_ids = special_token_ids.tolist()
    if isinstance(special_token_ids, (str, bytes)) or not isinstance(special_token_ids, Iterable):
        raise TypeError(f"special_token_ids must be a list of ints or None, got {type(special_token_ids).__name__}")
    ids = []
    for s in special_token_ids:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"special_token_ids must hold ints, got {s!r}")
        ids.append(int(s))
    ids = sorted(set(ids))
    if ids and ids[0] < 0:
        raise ValueError(f"special_token_ids must be >= 0, got {ids[0]}")
    if ids and ids[-1] >= vocab_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be greater than every special token id; the largest of "
            f"special_token_ids is {ids[-1]}"
        )
    if len(ids) > MAX_SPECIAL_IDS:
        raise ValueError(f"special_token_ids may hold at most {MAX_SPECIAL_IDS} distinct ids, got {len(ids)}")
    return ids


def threshold(p: float) -> int:
    """T(p) = round(p * 2^32): a uniform 32-bit draw u is below T(p) with probability p (to 2^-33)."""
    return min(_TWO32, int(round(p * _TWO32)))


def exact_count(n: int, p: float) -> int:
    """mode="exact"'s count for n units: round half up of n * p, with p read as the shortest decimal
    that prints as p (0.15 is 15/100, not the binary double 0.1499999999999999944...), computed in
    integers: floor((2 * n * num + den) / (2 * den)). So 10 units at 0.15 give 2 and 50 give 8."""
    q = Fraction(repr(float(p)))
    return (2 * n * q.numerator + q.denominator) // (2 * q.denominator)


def exact_threshold(p: float) -> int:
    """The t_select to hand the kernels in mode="exact". They count k = floor((n * T + 2^31) / 2^32);
    with T = ceil(q * 2^32) (q as in exact_count) that is exact_count(n, p) for every n with
    n * den(q) < 2^31 (e.g. any row below 21 million units at two decimals): T / 2^32 exceeds q by
    less than 2^-32, which lifts a tie n * q + 1/2 = integer onto the integer and stays below the
    next rounding step, at least 1 / (2 den(q)) away. Only k depends on T in this mode (the k
    smallest keys are selected), so the selection statistics do not change."""
    q = Fraction(repr(float(p)))
    return min(_TWO32, -((-q.numerator * _TWO32) // q.denominator))


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """A fresh 64-bit seed from `generator` (or torch's default generator, so torch.manual_seed
    reproduces a run)."""
    device = generator.device if generator is not None else torch.device("cpu")
    lo, hi = torch.randint(0, _TWO32, (2,), dtype=torch.int64, generator=generator, device=device).tolist()
    return lo | (hi << 32)


def _signed64(seed: int) -> int:
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# --- public API -----------------------------------------------------------------------------------------

def select_backend(input_ids: Tensor, backend: Optional[str] = None, *, exact: bool = False,
                   word_ids: bool = False, min_masked: int = 0) -> str:
    """The backend mlm_mask(input_ids, ..., backend=backend) would use."""
    return _resolve(input_ids, backend, exact, word_ids, min_masked).NAME


_FEATURES = backends.registry.feature_table("exact", "word_ids", "min_masked")


def _resolve(input_ids: Tensor, backend: Optional[str], exact: bool, word_ids: bool, min_masked: int):
    return BACKENDS.resolve(backend, input_ids.device.type, input_ids.dtype, None,
                            _FEATURES[bool(exact), bool(word_ids), bool(min_masked)])


def mlm_mask(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    mask_prob: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    special_token_ids: Optional[Iterable[int]] = None,
    special_tokens_mask: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    word_ids: Optional[Tensor] = None,
    mode: str = "bernoulli",
    min_masked: int = 0,
    random_excludes_special: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    inplace: bool = False,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """BERT's MLM masking: returns (masked_input_ids, labels).

    input_ids: int32 or int64 [B, L] (any strides). A token is eligible unless special
    (special_tokens_mask nonzero, or its id in special_token_ids), padding (attention_mask == 0) or
    already ignored (labels == -100). Each eligible token is selected with probability mask_prob
    (mode="bernoulli"), or exactly round(mask_prob * n_eligible) per sequence (mode="exact"; rounding
    half up, mask_prob read as the decimal it prints as: 10 tokens at 0.15 give 2; see exact_count); with
    min_masked=m every sequence gets at least min(m, n_eligible) selected. A selected token becomes
    mask_token_id with probability mask_replace_prob, a uniformly random id with random_replace_prob
    (never a special id nor mask_token_id when random_excludes_special), and stays otherwise.
    labels (input_ids' dtype) holds the original id where selected and -100 elsewhere.

    word_ids [B, L] (>= 0 word index within the sequence, < 0 for tokens outside words): whole-word
    masking: the unit of selection (and of counting in mode="exact" and min_masked) is a word, whose
    eligible pieces are selected together; tokens outside words are never selected. A word's pieces
    must be contiguous (as tokenizers' word_ids() give them).

    seed: a 64-bit int; the same seed gives bit-identical outputs on the cpu, cuda and triton
    backends (Philox4x32-10, counter layout in kernels/mlm/params.h). seed=None draws a fresh seed from
    `generator` (default: torch's default generator) per call. inplace=True writes the masked ids
    into input_ids and returns it. backend: None picks the fastest for the device; or "cpu",
    "cuda", "triton", "eager" (transformers' recipe in plain PyTorch: same statistics, its own
    random stream, no exact/word_ids/min_masked). The cpu backend also raises if a non-padding id
    is outside [0, vocab_size). Meta tensors (backend None or "eager") give meta outputs of the
    same shapes and dtype, as other torch ops do.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}")
    vocab_size = _check_int("vocab_size", vocab_size, 1)
    mask_token_id = _check_int("mask_token_id", mask_token_id)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}")
    mask_prob = _check_prob("mask_prob", mask_prob)
    mask_replace_prob = _check_prob("mask_replace_prob", mask_replace_prob)
    random_replace_prob = _check_prob("random_replace_prob", random_replace_prob)
    if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
        raise ValueError(
            f"mask_replace_prob + random_replace_prob must be at most 1, got {mask_replace_prob} + "
            f"{random_replace_prob} = {mask_replace_prob + random_replace_prob}"
        )
    specials = _special_list(special_token_ids, vocab_size)
    _check_like("special_tokens_mask", special_tokens_mask, input_ids, _MASK_DTYPES, "bool or an integer dtype")
    _check_like("attention_mask", attention_mask, input_ids, _MASK_DTYPES, "bool or an integer dtype")
    _check_like("labels", labels, input_ids, (torch.int32, torch.int64), "int32 or int64")
    _check_like("word_ids", word_ids, input_ids, (torch.int32, torch.int64), "int32 or int64")
    if mode not in ("bernoulli", "exact"):
        raise ValueError(f"mode must be 'bernoulli' or 'exact', got {mode!r}")
    min_masked = _check_int("min_masked", min_masked, 0)
    if not isinstance(random_excludes_special, bool):
        raise TypeError(f"random_excludes_special must be a bool, got {type(random_excludes_special).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and input_ids.numel() > 1 and any(st == 0 and n > 1 for st, n in zip(input_ids.stride(), input_ids.shape)):
        raise ValueError(
            f"inplace=True needs input_ids whose elements do not share memory, got strides {input_ids.stride()} "
            "(an expanded tensor); pass input_ids.clone() or inplace=False"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        seed = _check_int("seed", seed)
        if not 0 <= seed < (1 << 64):
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    excluded = sorted(set(specials) | {mask_token_id}) if random_excludes_special else []
    n_random = vocab_size - len(excluded)
    if random_replace_prob > 0 and n_random < 1:
        raise ValueError(
            f"random_replace_prob > 0 but every id in [0, vocab_size={vocab_size}) is excluded from random "
            "replacement (special ids and mask_token_id); pass random_excludes_special=False or a larger vocab_size"
        )
    if len(excluded) > MAX_SPECIAL_IDS:
        raise ValueError(f"special_token_ids plus mask_token_id may hold at most {MAX_SPECIAL_IDS} ids, got {len(excluded)}")
    exact = mode == "exact"
    if input_ids.device.type == "meta" and backend in (None, "eager"):
        # shapes only (model tracing, torch.device("meta") initialisation): the outputs a real
        # device would give, without drawing random numbers a meta tensor cannot hold
        lab = _new_like(input_ids)
        return (input_ids if inplace else _new_like(input_ids)), lab
    b = _resolve(input_ids, backend, exact, word_ids is not None, min_masked)
    if not b.CUSTOM_OP:
        return b.impl(
            input_ids, vocab_size=vocab_size, mask_token_id=mask_token_id, mask_prob=mask_prob,
            mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob,
            special_token_ids=specials, special_tokens_mask=special_tokens_mask, attention_mask=attention_mask,
            labels=labels, excluded_ids=excluded, seed=seed, generator=generator, inplace=inplace,
        )

    if seed is None:
        seed = _draw_seed(generator)
    t_mask = threshold(mask_replace_prob)
    t_random = max(t_mask, threshold(min(1.0, mask_replace_prob + random_replace_prob)))
    args = (special_tokens_mask, attention_mask, labels, word_ids, specials, excluded if t_random > t_mask else [],
            vocab_size, mask_token_id, _signed64(seed), exact_threshold(mask_prob) if exact else threshold(mask_prob),
            t_mask, t_random,
            max(n_random, 1), exact, min_masked, b.NAME)
    if direct_call_ok(input_ids, special_tokens_mask, attention_mask, labels, word_ids):
        # Plain eager call: run the kernel without the custom op's dispatcher round trip (~0.1 ms on
        # this CPU, more than the kernel at BERT batch sizes). Same kernel, same outputs.
        out = input_ids if inplace else _new_like(input_ids)
        lab = _new_like(input_ids)
        b.impl(input_ids, out, lab, *args[:-1])
        return out, lab
    if inplace:
        lab = mlm_mask_inplace_op(input_ids, *args)
        return input_ids, lab
    return mlm_mask_op(input_ids, *args)
