"""DeBERTa-v2/v3 on forkattn.disentangled_attention, in one file.

    embeddings: word (+ learned position when position_biased_input) (+ token_type) -> [embed_proj]
                -> LayerNorm -> times the attention mask (padded positions zero) -> dropout
    encoder:    num_hidden_layers post-LN layers, each
                    x = LN(x + dropout(W_o · disentangled_attention(W_q x, W_k x, W_v x,
                                                                     pos_key, pos_query, mask)))
                    x = LN(x + dropout(W_2 · act(W_1 x)))
                with pos_key = W_pk · R, pos_query = W_pq · R (share_att_key: W_k and W_q) per head,
                R the relative embeddings encoder.rel_embeddings (LayerNorm'd with norm_rel_ebd
                "layer_norm"); conv_kernel_size > 0 adds DeBERTa-v2's ConvLayer after the first layer.
    heads:      masked LM (legacy `cls.predictions`, or the `lm_predictions.lm_head` of config.legacy
                = False; both decode with the word embeddings), sequence classification (ContextPooler
                on the first token), token classification, question answering.

Parameter names are transformers' (deberta.encoder.layer.0.attention.self.query_proj.weight, ...),
so loading a transformers checkpoint is a key-for-key copy (models/checkpoint.py); save_pretrained
writes a folder transformers' DebertaV2* classes load. `config.attention_backend` picks the
backend of disentangled_attention (models/backend.py). Outputs are models/outputs.py's.

Dropout as transformers': hidden_dropout_prob on the embeddings, the relative embeddings and both
residual branches, and attention_probs_dropout_prob on the attention probabilities in training
mode, through disentangled_attention's dropout_p (the kernels' Philox mask, regenerated in the
backward; backend=None picks a backend that has dropout). Each layer's AttentionDropout
(models/dropout.py, at attention.self.dropout as in transformers) draws a fresh seed per call from
torch's default generator (or set_attention_dropout_generator's), so torch.manual_seed reproduces
a run; the masks differ from transformers' (Philox, not torch's bernoulli), their statistics do not.

Differences from transformers: padded query rows attend to the real keys (transformers spreads them
over every key): outputs agree at real tokens, and a loss that reads padded positions (question answering's softmax over all positions) differs.
transformers' DebertaV2Model keeps a z_steps hook (always 0) for the enhanced mask decoder; it has
no effect there and is left out here. The checkpoint's mask_predictions.* (replaced-token
detection) are ignored on load, as transformers does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forkattn

from .activations import activation, check_activation
from .backend import attention_backend, check_backend
from .checkpoint import load_state
from .dropout import AttentionDropout
from .outputs import (BaseModelOutput, MaskedLMOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                      TokenClassifierOutput)
from .pretrained import (JsonConfig, PreTrainedModel, build_config, config_json, merge_overrides, normalize_labels,
                         qa_loss)

# --- config ----------------------------------------------------------------------------------------

@dataclass
class DebertaV2Config(JsonConfig):
    """transformers' DebertaV2Config fields (config.json), with its defaults."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # on the attention probabilities, in training
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = -1  # > 0: log-bucketed relative positions (DeBERTa-v3: 256)
    pad_token_id: int = 0
    position_biased_input: bool = True  # add absolute position embeddings (DeBERTa-v3: False)
    pos_att_type: Optional[List[str]] = None  # subset of ["p2c", "c2p"]; "p2c|c2p" in old configs
    share_att_key: bool = False  # pos_key / pos_query through key_proj / query_proj
    norm_rel_ebd: str = "none"  # "layer_norm": LayerNorm on the relative embeddings
    embedding_size: Optional[int] = None  # None = hidden_size, no embed_proj
    conv_kernel_size: int = 0  # > 0: ConvLayer after the first layer
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: Optional[int] = None  # None = hidden_size (the only size supported)
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: Optional[float] = None  # None = hidden_dropout_prob
    legacy: bool = True  # masked LM head: cls.predictions (True) or lm_predictions.lm_head
    num_labels: int = 2
    problem_type: Optional[str] = None
    id2label: Optional[Dict[int, str]] = None
    attention_backend: Optional[str] = None  # disentangled_attention's backend; None = fastest

    def __post_init__(self):
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [x.strip() for x in self.pos_att_type.lower().split("|")]
        self.pos_att_type = list(self.pos_att_type or [])
        bad = [t for t in self.pos_att_type if t not in ("c2p", "p2c")]
        if bad:
            raise ValueError(f"pos_att_type must hold only 'c2p' and 'p2c', got {self.pos_att_type}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.pooler_hidden_size is None:
            self.pooler_hidden_size = self.hidden_size
        if self.pooler_hidden_size != self.hidden_size:
            raise ValueError(f"pooler_hidden_size must equal hidden_size {self.hidden_size} (transformers' "
                             f"classifier reads hidden_size features), got {self.pooler_hidden_size}")
        for field in ("hidden_act", "pooler_hidden_act", "conv_act"):
            check_activation(getattr(self, field), field)
        check_backend(self.attention_backend)
        if self.relative_attention:
            forkattn.disentangled.check_positions(self.max_relative, self.position_buckets)
        normalize_labels(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_relative(self) -> int:
        """max_relative_positions, with transformers' "< 1 means max_position_embeddings"."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def span(self) -> int:
        """The attention span: the relative embeddings have 2 * span rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "DebertaV2Config":
        """From a transformers config.json (model_type deberta-v2) or our fields; other keys ignored."""
        d = merge_overrides(d, overrides)
        head = d.get("attention_head_size")
        if head is not None and head * d.get("num_attention_heads", 24) != d.get("hidden_size", 1536):
            raise NotImplementedError(f"attention_head_size={head} (heads wider or narrower than hidden_size / "
                                      "num_attention_heads) is not supported")
        return build_config(cls, d)

    def to_dict(self) -> dict:
        """transformers' config.json contents."""
        d = config_json(self, drop=[n for n in ("embedding_size", "cls_dropout") if getattr(self, n) is None])
        d["model_type"] = "deberta-v2"
        return d


# --- building blocks ---------------------------------------------------------------------------------

class DebertaV2Embeddings(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        size = config.embedding_size or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, size)
                                    if config.position_biased_input else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(size, config.hidden_size, bias=False) if size != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, mask: Optional[Tensor]) -> Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        return self.dropout(x)


class DisentangledSelfAttention(nn.Module):
    """Projections under transformers' names; the attention itself is forkattn.disentangled_attention."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.query_proj, self.key_proj, self.value_proj = (nn.Linear(h, h) for _ in range(3))
        types = config.pos_att_type
        self.c2p = config.relative_attention and "c2p" in types
        self.p2c = config.relative_attention and "p2c" in types
        self.scale = (config.head_dim * (1 + ("c2p" in types) + ("p2c" in types))) ** -0.5
        self.dropout = AttentionDropout(config.attention_probs_dropout_prob, "attention_probs_dropout_prob")
        if config.relative_attention:
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not config.share_att_key:
                if "c2p" in types:
                    self.pos_key_proj = nn.Linear(h, h)
                if "p2c" in types:
                    self.pos_query_proj = nn.Linear(h, h)

    def _pos(self, proj: nn.Linear, rel: Tensor) -> Tensor:
        H = self.config.num_attention_heads
        return proj(rel).view(rel.shape[0], H, -1).transpose(0, 1)  # [H, 2 span, D]

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], rel: Optional[Tensor]) -> Tensor:
        B, L, _ = x.shape
        cfg = self.config
        H = cfg.num_attention_heads
        q, k, v = (p(x).view(B, L, H, -1).transpose(1, 2) for p in (self.query_proj, self.key_proj, self.value_proj))
        pos_key = pos_query = None
        if self.c2p or self.p2c:
            rel = self.pos_dropout(rel[: 2 * cfg.span])
            if self.c2p:
                pos_key = self._pos(self.key_proj if cfg.share_att_key else self.pos_key_proj, rel)
            if self.p2c:
                pos_query = self._pos(self.query_proj if cfg.share_att_key else self.pos_query_proj, rel)
        out = forkattn.disentangled_attention(
            q, k, v, pos_key, pos_query, max_relative_positions=cfg.max_relative, position_buckets=cfg.position_buckets,
            key_padding_mask=key_padding_mask, scale=self.scale, c2p=self.c2p, p2c=self.p2c,
            backend=attention_backend(cfg), **self.dropout.kwargs())  # dropout_p in training, {} in eval
        return out.transpose(1, 2).reshape(B, L, -1)


class _DenseLN(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): DeBERTa's SelfOutput and Output."""

    def __init__(self, config: DebertaV2Config, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class DebertaV2Attention(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = _DenseLN(config, config.hidden_size)

    def forward(self, x, key_padding_mask, rel):
        return self.output(self.self(x, key_padding_mask, rel), x)


class DebertaV2Intermediate(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class DebertaV2Layer(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = DebertaV2Intermediate(config)
        self.output = _DenseLN(config, config.intermediate_size)

    def forward(self, x, key_padding_mask, rel):
        x = self.attention(x, key_padding_mask, rel)
        return self.output(self.intermediate(x), x)


class ConvLayer(nn.Module):
    """DeBERTa-v2's convolution beside the first layer: LN(residual + act(conv(embeddings) masked)) masked."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        ks = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, ks, padding=(ks - 1) // 2,
                              groups=config.conv_groups)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = activation(config.conv_act)

    def forward(self, x: Tensor, residual: Tensor, mask: Tensor) -> Tensor:
        keep = mask[..., None].to(x.dtype)
        out = self.conv(x.transpose(1, 2)).transpose(1, 2) * keep
        return self.LayerNorm(residual + self.act(self.dropout(out))) * keep


class DebertaV2Encoder(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.span, config.hidden_size)
        if "layer_norm" in [x.strip() for x in config.norm_rel_ebd.lower().split("|")]:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.conv = ConvLayer(config) if config.conv_kernel_size > 0 else None

    def get_rel_embedding(self) -> Optional[Tensor]:
        if not self.config.relative_attention:
            return None
        rel = self.rel_embeddings.weight
        return self.LayerNorm(rel) if hasattr(self, "LayerNorm") else rel

    def forward(self, x: Tensor, mask: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        rel = self.get_rel_embedding()
        embeddings = x
        for i, layer in enumerate(self.layer):
            x = layer(x, key_padding_mask, rel)
            if i == 0 and self.conv is not None:
                x = self.conv(embeddings, x, mask)
        return x


# --- models --------------------------------------------------------------------------------------------

class DebertaV2PreTrainedModel(PreTrainedModel):
    """DeBERTa's checkpoint keys; init, from_pretrained / save_pretrained are models/pretrained.py's."""

    config_class = DebertaV2Config
    applies_attention_dropout = True  # attention.self.dropout (models/dropout.py): no warning on train()

    def load_hf_state_dict(self, state: Dict[str, Tensor], *, ignore_mismatched_sizes: bool = False,
                           strict: bool = False, log: bool = False) -> dict:
        """Copy a transformers-named state dict in; the base model's keys load with or without "deberta."."""
        own = set(self.state_dict())
        prefix = "deberta."

        def map_key(key: str, t: Tensor):
            if (key.startswith("mask_predictions.") or key.endswith("position_ids")
                    or key == "cls.predictions.decoder.weight"):
                return None  # replaced-token detection head, a buffer, the tied decoder
            if key == "cls.predictions.decoder.bias":
                key = "cls.predictions.bias"
            if key not in own:
                if key.startswith(prefix) and key[len(prefix):] in own:
                    key = key[len(prefix):]
                elif prefix + key in own:
                    key = prefix + key
            return key, t
        return load_state(self, state, map_key, ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict,
                          owner=f"{type(self).__name__}.from_pretrained", log=log)

    def hf_state_dict(self) -> Dict[str, Tensor]:
        """The state dict: its names are transformers' already."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def _deberta(self, input_ids, attention_mask, token_type_ids, position_ids) -> Tensor:
        return self.deberta(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state


class DebertaV2Model(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> BaseModelOutput:
        """attention_mask [B, L], 1 / True = real token; padded positions are zeroed after the
        embeddings and hidden from every key."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        L, cfg = input_ids.shape[1], self.config
        if cfg.position_biased_input and L > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has length {L}, more than max_position_embeddings {cfg.max_position_embeddings} "
                             "(this config adds absolute position embeddings)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        kpm = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids, position_ids, attention_mask)
        x = self.encoder(x, attention_mask, None if bool(kpm.all()) else kpm)
        return BaseModelOutput(last_hidden_state=x)


class _LegacyPredictionHeadTransform(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        size = config.embedding_size or config.hidden_size
        self.dense = nn.Linear(config.hidden_size, size)
        self.LayerNorm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class _LegacyLMPredictionHead(nn.Module):
    """cls.predictions: transform, then the word embeddings (the tied decoder) plus a bias."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.transform = _LegacyPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.transform(x), word_embeddings, self.bias)


class _LMPredictionHead(nn.Module):
    """lm_predictions.lm_head (legacy=False): dense -> act -> LayerNorm -> word embeddings + bias."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(x))), word_embeddings, self.bias)


class _Wrap(nn.Module):
    """A one-child container, for transformers' names (cls.predictions, lm_predictions.lm_head)."""

    def __init__(self, name: str, child: nn.Module):
        super().__init__()
        self.add_module(name, child)
        self.name = name

    def forward(self, *args):
        return getattr(self, self.name)(*args)


class DebertaV2ForMaskedLM(DebertaV2PreTrainedModel):
    """Logits [B, L, vocab] over the word embeddings; loss with labels (-100 ignored)."""

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        if config.legacy:
            self.cls = _Wrap("predictions", _LegacyLMPredictionHead(config))
        else:
            self.lm_predictions = _Wrap("lm_head", _LMPredictionHead(config))
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> MaskedLMOutput:
        x = self._deberta(input_ids, attention_mask, token_type_ids, position_ids)
        head = self.cls if self.config.legacy else self.lm_predictions
        logits = head(x, self.deberta.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits)


class ContextPooler(nn.Module):
    """The first token -> dropout -> dense -> pooler_hidden_act."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.act = activation(config.pooler_hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(self.dropout(x[:, 0])))


def _classification_loss(config: DebertaV2Config, logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' DebertaV2ForSequenceClassification loss: without problem_type, num_labels 1 is
    regression, integer labels are classes (negative ones ignored), other labels soft targets."""
    problem, n = config.problem_type, config.num_labels
    if problem is None:
        if n == 1:
            return F.mse_loss(logits.view(-1).to(labels.dtype), labels.view(-1))
        if labels.dim() == 1 or labels.shape[-1] == 1:
            labels = labels.view(-1).long()
            keep = labels >= 0
            if not bool(keep.any()):
                return logits.sum() * 0
            return F.cross_entropy(logits[keep].float(), labels[keep])
        return -(F.log_softmax(logits, -1) * labels).sum(-1).mean()
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


class DebertaV2ForSequenceClassification(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        p = config.cls_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> SequenceClassifierOutput:
        x = self._deberta(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(self.pooler(x)))
        loss = None if labels is None else _classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class DebertaV2ForTokenClassification(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> TokenClassifierOutput:
        logits = self.classifier(self.dropout(self._deberta(input_ids, attention_mask, token_type_ids, position_ids)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels).float(), labels.view(-1))
        return TokenClassifierOutput(loss=loss, logits=logits)


class DebertaV2ForQuestionAnswering(DebertaV2PreTrainedModel):
    """Start / end logits per token (qa_outputs has num_labels = 2 outputs, as in transformers)."""

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"DebertaV2ForQuestionAnswering needs num_labels = 2 (start, end), got {config.num_labels}")
        self.deberta = DebertaV2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None) -> QuestionAnsweringModelOutput:
        x = self._deberta(input_ids, attention_mask, token_type_ids, position_ids)
        start_logits, end_logits = self.qa_outputs(x).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = qa_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


MODEL_CLASSES: Dict[str, type] = {c.__name__: c for c in (
    DebertaV2Model, DebertaV2ForMaskedLM, DebertaV2ForSequenceClassification, DebertaV2ForTokenClassification,
    DebertaV2ForQuestionAnswering)}

__all__ = ["DebertaV2Config", *MODEL_CLASSES]
