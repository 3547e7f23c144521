"""What forkattn's models return: dataclasses with transformers' class and field names.

Like transformers' ModelOutput, a result reads both ways, `out.logits` and `out["logits"]`
(training code uses both). A field the call did not compute is None (`out.loss` without labels);
keys(), items(), iteration and `in` see only the computed fields, and `out[0]` is the first of
them, as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Tuple

from torch import Tensor


@dataclass
class ModelOutput:
    """Base class: attribute and key access to the fields (see the module docstring)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._names():
                raise KeyError(f"{type(self).__name__} has no field {key!r} (fields: {', '.join(self._names())})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def _names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def keys(self) -> Tuple[str, ...]:
        return tuple(n for n in self._names() if getattr(self, n) is not None)

    def values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.keys())

    def items(self) -> Tuple[Tuple[str, Any], ...]:
        return tuple((n, getattr(self, n)) for n in self.keys())

    def to_tuple(self) -> Tuple[Any, ...]:
        return self.values()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Optional[Tensor] = None  # [B, L, hidden]
    pooler_output: Optional[Tensor] = None  # [B, hidden]; None without a pooler


@dataclass
class _LossAndLogits(ModelOutput):
    loss: Optional[Tensor] = None  # with labels
    logits: Optional[Tensor] = None


class MaskedLMOutput(_LossAndLogits):
    """logits [B, L, vocab], or [n_labelled, vocab] with BertConfig.sparse_prediction."""


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None
    seq_relationship_logits: Optional[Tensor] = None  # next-sentence prediction


@dataclass
class AlbertForPreTrainingOutput(ModelOutput):
    loss: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None
    sop_logits: Optional[Tensor] = None  # sentence-order prediction


class SequenceClassifierOutput(_LossAndLogits):
    """logits [B, num_labels]."""


class TokenClassifierOutput(_LossAndLogits):
    """logits [B, L, num_labels]."""


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None


class CausalLMOutput(_LossAndLogits):
    """logits [B, T, vocab]; loss (with labels): next-token cross-entropy."""


@dataclass
class BaseModelOutput(ModelOutput):
    """An encoder without a pooler (DeBERTa): last_hidden_state [B, L, hidden]."""

    last_hidden_state: Optional[Tensor] = None
