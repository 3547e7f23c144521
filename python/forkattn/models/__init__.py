"""forkattn's models: `from forkattn.models import BertModel, GPT, GPTConfig, ...`.

The names load on first use (PEP 562), so `import forkattn.models` stays cheap and the tokenizer
(which needs the `tokenizers` package) is imported only when asked for.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "bert": ["BertConfig", "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForPreTrainingSOP",
             "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"],
    "bert_graphs": ["BertGraphRunner"],
    "bert_tokenizer": ["BertTokenizer"],
    "gpt": ["GPT", "GPTConfig"],
    "generation": ["GenerationMixin", "KVCacheBase", "StaticKVCache", "ForkattnKVCache", "make_cache"],
    "icl": ["ICLClassifier", "Prediction", "format_prompt"],
    "checkpoint": ["read_state_dict", "load_state"],
    "padding": ["Packing"],
    "dropout": ["AttentionDropout", "set_attention_dropout_generator"],
    "outputs": ["ModelOutput", "CausalLMOutput"],
    "deberta": ["DebertaV2Config", "DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
                "DebertaV2ForTokenClassification", "DebertaV2ForQuestionAnswering"],
    "deberta_tokenizer": ["load_deberta_tokenizer"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
