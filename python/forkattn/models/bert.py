"""BERT (and ALBERT's two tricks) on forkattn.attention, in one file.

    embeddings: word + token_type + learned position -> LayerNorm -> dropout
                (ALBERT: embedding_size < hidden_size, then a linear projection up)
    encoder:    num_hidden_layers post-LN layers, each
                    x = LN(x + dropout(W_o · attention(W_q x, W_k x, W_v x, key_padding_mask)))
                    x = LN(x + dropout(W_2 · gelu(W_1 x)))
                (ALBERT: num_hidden_groups < num_hidden_layers shares one layer's weights across
                 consecutive layers)
    pooler:     tanh(W · x[:, 0])  ([CLS])
    heads:      masked LM (decoder tied to the word embeddings), pre-training (MLM + next-sentence
                or sentence-order prediction), sequence / token classification, question answering.

Parameter names are transformers' (bert.encoder.layer.0.attention.self.query.weight, ...), so
loading a transformers checkpoint is a key-for-key copy; ALBERT checkpoints are a renaming (the
explicit table in models/bert_names.py). Attention is forkattn.attention with BERT's
attention_mask as the key-padding mask; `config.attention_backend` (None = fastest for the device)
picks its backend (models/backend.py). Outputs are models/outputs.py's, checkpoints go through
models/checkpoint.py.

Padded batches run unpadded (config.unpad_inputs, on by default): the attention mask is read once,
the real tokens are packed into [tokens, hidden] right after the embedding lookup
(models/padding.py), every layer works on them alone (forkattn.attention_varlen for attention),
and the result is scattered back into [B, L, hidden] with zeros at the padded positions. At
BERT's usual lengths uniform in L/2..L that skips a quarter of every GEMM, not only of attention.
transformers computes values at the padded positions; we do not (they are zeros, and heads see
zeros there): compare outputs at real tokens.

Dropout as transformers': hidden_dropout_prob on the embeddings and both residual branches, and
attention_probs_dropout_prob on the attention probabilities in training mode, through
forkattn.attention's (and attention_varlen's) dropout_p on either layout and every backend that has
dropout (eager, cpu, triton, cuda). Each layer's
AttentionDropout (models/dropout.py, at attention.self.dropout as in transformers) draws a fresh seed
per call from torch's default generator (or set_attention_dropout_generator's), so
torch.manual_seed reproduces a run. The masks differ from transformers' (Philox, not torch's
bernoulli), the statistics do not (scripts/dropout_loss_curve.py); the unpadded layout counts
positions inside each sequence, so a left-padded row draws other (equally random) masks than in
the padded layout, a right-padded one the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forkattn

from .activations import activation, check_activation
from .backend import attention_backend, check_backend
from .bert_names import hf_key, key_map_from_hf
from .checkpoint import load_state
from .cpu_inference import fast_path, fused_epilogues, native_layer, qkv_projection, serial_torch_ops
from .dropout import AttentionDropout
from .outputs import (AlbertForPreTrainingOutput, BaseModelOutputWithPooling, BertForPreTrainingOutput,
                      MaskedLMOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput)
from .padding import Packing
from .pretrained import (JsonConfig, PreTrainedModel, build_config, config_json, merge_overrides, normalize_labels,
                         qa_loss)

# --- config ----------------------------------------------------------------------------------------

@dataclass
class BertConfig(JsonConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # on the attention probabilities, in training
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: Optional[float] = None  # None = hidden_dropout_prob
    num_labels: int = 2
    problem_type: Optional[str] = None  # "regression", "single_label_classification", "multi_label_classification"
    id2label: Optional[Dict[int, str]] = None
    # ALBERT: factorized embeddings (word/position/type embeddings of this width, then a linear
    # projection to hidden_size) and cross-layer sharing (layer i uses group i * groups // layers).
    embedding_size: Optional[int] = None  # None = hidden_size, no projection
    num_hidden_groups: Optional[int] = None  # None = num_hidden_layers, no sharing
    model_type: str = "bert"  # "bert" or "albert": which checkpoint key names to read and write
    attention_backend: Optional[str] = None  # forkattn.attention backend; None = fastest (models/backend.py)
    # Padded batches run unpadded: the real tokens are packed once after the embeddings and every
    # layer (linears, LayerNorms, attention via forkattn.attention_varlen) sees only them; padded
    # positions of last_hidden_state are zeros. False = the padded layout with a key-padding mask.
    unpad_inputs: bool = True
    # Masked-LM heads with labels: project to the vocabulary only at the labelled positions
    # (~15% of tokens) instead of all B x L; `logits` / `prediction_logits` are then
    # [n_labelled, vocab] in row-major order of the labels. Same loss and gradients; for training
    # (the bert-mlm trainer turns it on). False = transformers' [B, L, vocab] logits.
    sparse_prediction: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        groups = self.num_groups
        if not 1 <= groups <= self.num_hidden_layers:
            raise ValueError(f"num_hidden_groups must be in [1, num_hidden_layers={self.num_hidden_layers}], got {groups}")
        if self.model_type not in ("bert", "albert"):
            raise ValueError(f"model_type must be 'bert' or 'albert', got {self.model_type!r}")
        check_activation(self.hidden_act, "hidden_act")
        check_backend(self.attention_backend)
        normalize_labels(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        return self.num_hidden_groups or self.num_hidden_layers

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "BertConfig":
        """From a dict of our fields or a transformers config.json (BERT or ALBERT); other keys are ignored."""
        d = merge_overrides(d, overrides)
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("decoder BERT / cross-attention is not supported (encoder only)")
        if d.get("model_type") == "albert":
            if d.get("inner_group_num", 1) != 1:
                raise ValueError(f"ALBERT inner_group_num must be 1, got {d['inner_group_num']}")
            d.setdefault("embedding_size", 128)
            d.setdefault("num_hidden_groups", 1)
            d.setdefault("hidden_act", "gelu_new")
            if "classifier_dropout_prob" in d and "classifier_dropout" not in d:
                d["classifier_dropout"] = d["classifier_dropout_prob"]
        return build_config(cls, d)

    def to_dict(self) -> dict:
        """transformers-style config.json contents (loadable by transformers when model_type allows)."""
        d = config_json(self, drop=("unpad_inputs", "sparse_prediction"))
        if self.model_type == "albert":
            d["embedding_size"] = self.embedding_size or self.hidden_size
            d["num_hidden_groups"] = self.num_groups
            d["inner_group_num"] = 1
            d["classifier_dropout_prob"] = self.classifier_dropout if self.classifier_dropout is not None else 0.1
        elif self.embedding_size is None:
            d.pop("embedding_size")
        if self.num_hidden_groups is None:
            d.pop("num_hidden_groups")
        d["position_embedding_type"] = "absolute"
        return d


# --- building blocks ---------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        E = config.embedding_size or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.LayerNorm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor]) -> Tensor:
        """input_ids [B, L] (positions 0..L-1 unless given), or packed tokens [T] with position_ids [T].
        Lengths are checked by the callers (check_length)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def check_length(L: int, config: BertConfig) -> None:
    if L > config.max_position_embeddings:
        raise ValueError(f"input_ids has length {L}, more than max_position_embeddings {config.max_position_embeddings}")


class BertLayer(nn.Module):
    """Post-LN transformer layer; module names are transformers' BertLayer's."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H, I, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.attention = nn.ModuleDict(dict(
            self=nn.ModuleDict(dict(query=nn.Linear(H, H), key=nn.Linear(H, H), value=nn.Linear(H, H),
                                    dropout=AttentionDropout(config.attention_probs_dropout_prob,
                                                             "attention_probs_dropout_prob"))),
            output=nn.ModuleDict(dict(dense=nn.Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=eps))),
        ))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(H, I)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(I, H), LayerNorm=nn.LayerNorm(H, eps=eps)))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = activation(config.hidden_act)
        self.num_heads = config.num_attention_heads
        self.config = config

    def qkv(self, x: Tensor, fast=None):
        """q, k, v as [..., heads, head_dim] views of one GEMM against the concatenated weights (one
        read of x instead of three; the parameters stay transformers' three Linears)."""
        # the concatenation is cached when no gradient is recorded (models/cpu_inference.py)
        return qkv_projection(self, x, fast).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], packing: Optional[Packing] = None) -> Tensor:
        """x [B, L, hidden] with key_padding_mask [B, L] or None; or packed [T, hidden] with `packing`."""
        att, backend = self.attention, attention_backend(self.config)
        drop = att.self.dropout.kwargs()  # dropout_p (and generator) in training, {} in eval
        fast = fast_path(self, x)  # eval, no autograd, fp32 CPU: packed GEMMs + fused C++ epilogues
        if (y := native_layer(self, x, key_padding_mask, fast, backend, packing)) is not None:
            return y  # no mask, or a padded batch's packed tokens: the whole layer in one native call
        if packing is None:
            B, L, H = x.shape
            # [B, L, heads, head_dim] -> [B, heads, L, head_dim] views; forkattn reads the strides in place
            q, k, v = (t.transpose(1, 2) for t in self.qkv(x, fast))
            y = forkattn.attention(q, k, v, key_padding_mask=key_padding_mask, backend=backend, **drop)
            y = y.transpose(1, 2).reshape(B, L, H)  # free: the output has [B, L, heads, head_dim] memory
        else:
            q, k, v = self.qkv(x, fast)  # [T, heads, head_dim] views
            # cu_seqlens were built on the host from the mask: no per-layer device-to-host re-check
            y = forkattn.attention_varlen(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                          packing.max_seqlen, backend=backend, validate_seqlens=False,
                                          **drop).flatten(1)
        if fast is not None:
            return fused_epilogues(self, x, y, fast)
        x = att.output.LayerNorm(x + self.dropout(att.output.dense(y)))
        y = self.output.dense(self.act(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + self.dropout(y))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.embedding_size is not None:  # ALBERT's factorized embeddings
            self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_groups))
        self.num_hidden_layers = config.num_hidden_layers

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], packing: Optional[Packing] = None) -> Tensor:
        if hasattr(self, "embedding_hidden_mapping_in"):
            x = self.embedding_hidden_mapping_in(x)
        groups = len(self.layer)
        for i in range(self.num_hidden_layers):
            x = self.layer[i * groups // self.num_hidden_layers](x, key_padding_mask, packing)
        return x


# --- the model and its heads ---------------------------------------------------------------------

class BertPreTrainedModel(PreTrainedModel):
    """BERT's checkpoint names (models/bert_names.py); the rest is models/pretrained.py's."""

    base_model_prefix = "bert"
    config_class = BertConfig
    applies_attention_dropout = True  # attention.self.dropout (models/dropout.py): no warning on train()

    def load_hf_state_dict(self, state: Dict[str, Tensor], *, ignore_mismatched_sizes: bool = False,
                           strict: bool = False, log: bool = False) -> dict:
        """Copy a transformers-named state dict in (checkpoint.load_state); return the key report
        (logged too with log=True, as from_pretrained does)."""
        map_key = key_map_from_hf(state, self.config.model_type, self.base_model_prefix)
        return load_state(self, state, map_key, ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict,
                          owner=f"{type(self).__name__}.from_pretrained", log=log)

    def hf_state_dict(self) -> Dict[str, Tensor]:
        """The state dict under transformers' names (ALBERT names when config.model_type == 'albert')."""
        return {hf_key(k, self.config.model_type, self.base_model_prefix): v.detach().contiguous()
                for k, v in self.state_dict().items()}

    def _hf_architecture(self) -> str:
        name = type(self).__name__
        if self.config.model_type == "albert":
            name = {"BertForPreTrainingSOP": "AlbertForPreTraining"}.get(name, name.replace("Bert", "Albert"))
        return name

    def _bert(self, input_ids, attention_mask, token_type_ids, position_ids, pool=True):
        return self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         position_ids=position_ids, add_pooling=pool)


class BertModel(BertPreTrainedModel):
    base_model_prefix = ""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        H = config.hidden_size
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(H, H))) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                add_pooling: bool = True) -> BaseModelOutputWithPooling:
        """input_ids [B, L]; attention_mask [B, L] (1/True = real token, 0 = padding); -> outputs with
        last_hidden_state [B, L, hidden] and pooler_output [B, hidden] (None without a pooler).

        With padding and config.unpad_inputs, the encoder runs on the packed real tokens and
        last_hidden_state is zero at the padded positions; reading the mask costs one small
        device-to-host copy (so this path is not CUDA-graph capturable: see
        forkattn.models.bert_graphs.BertGraphRunner)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        check_length(input_ids.shape[1], self.config)
        packing = None
        if attention_mask is not None and self.config.unpad_inputs:
            packing = Packing.from_mask(attention_mask)
            if packing.dense:
                packing, attention_mask = None, None
        if packing is None:
            key_padding_mask = None if attention_mask is None else attention_mask.bool()
            with serial_torch_ops(input_ids):  # batch 1 on CPU: no OpenMP worker left spinning
                x = self.embeddings(input_ids, token_type_ids, position_ids)
            x = self.encoder(x, key_padding_mask)
        else:
            x = self.encode_packed(packing, packing.pack(input_ids),
                                   None if token_type_ids is None else packing.pack(token_type_ids.expand_as(input_ids)),
                                   packing.pack(self._positions(input_ids, position_ids)))
            x = packing.unpack(x)
        pooled = None
        if self.pooler is not None and add_pooling:
            with serial_torch_ops(input_ids):  # no OpenMP worker left spinning into the next forward
                pooled = torch.tanh(self.pooler.dense(x[:, 0]))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def _positions(self, input_ids: Tensor, position_ids: Optional[Tensor]) -> Tensor:
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)
        return position_ids.expand(B, L)

    def encode_packed(self, packing: Packing, input_ids: Tensor, token_type_ids: Optional[Tensor],
                      position_ids: Tensor) -> Tensor:
        """The encoder on packed tokens: ids, types, positions [T] -> hidden states [T, hidden]."""
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(x, None, packing)


class BertLMHead(nn.Module):
    """transform (dense to the embedding width, act, LayerNorm), then the tied decoder + bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        E = config.embedding_size or config.hidden_size
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(config.hidden_size, E),
                                            LayerNorm=nn.LayerNorm(E, eps=config.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        x = self.transform.LayerNorm(self.act(self.transform.dense(x)))
        return F.linear(x, word_embeddings, self.bias)


def _mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def _mlm_logits_and_loss(head: "BertLMHead", x: Tensor, word_embeddings: Tensor, labels: Optional[Tensor],
                         sparse: bool):
    """(logits, loss or None). sparse (with labels): only the labelled rows of x reach the
    vocabulary projection, the largest GEMM of a BERT training step and its biggest activation."""
    if sparse and labels is not None:
        picked = labels.reshape(-1) != -100
        logits = head(x.flatten(0, -2)[picked], word_embeddings)
        return logits, F.cross_entropy(logits.float(), labels.reshape(-1)[picked])
    logits = head(x, word_embeddings)
    return logits, (_mlm_loss(logits, labels) if labels is not None else None)


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = nn.ModuleDict(dict(predictions=BertLMHead(config)))
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> MaskedLMOutput:
        """labels [B, L]: the original ids at masked positions, -100 elsewhere (ignored by the loss).
        logits [B, L, vocab], or [n_labelled, vocab] with config.sparse_prediction and labels."""
        x = self._bert(input_ids, attention_mask, token_type_ids, position_ids, pool=False).last_hidden_state
        logits, loss = _mlm_logits_and_loss(self.cls.predictions, x, self.bert.embeddings.word_embeddings.weight,
                                            labels, self.config.sparse_prediction)
        return MaskedLMOutput(loss=loss, logits=logits)


class BertForPreTraining(BertPreTrainedModel):
    """MLM + next-sentence prediction (label 0 = B follows A, 1 = B is random)."""

    output_type = BertForPreTrainingOutput  # its pair logits field: seq_relationship_logits

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict(dict(predictions=BertLMHead(config), seq_relationship=nn.Linear(config.hidden_size, 2)))
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, sentence_order_label=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids)
        prediction_logits, loss = _mlm_logits_and_loss(self.cls.predictions, out.last_hidden_state,
                                                       self.bert.embeddings.word_embeddings.weight, labels,
                                                       self.config.sparse_prediction)
        pair_logits = self.cls.seq_relationship(out.pooler_output)
        pair_label = next_sentence_label if sentence_order_label is None else sentence_order_label
        if loss is not None and pair_label is not None:
            loss = loss + F.cross_entropy(pair_logits.float(), pair_label.view(-1))
        return self.output_type(loss, prediction_logits, pair_logits)


class BertForPreTrainingSOP(BertForPreTraining):
    """ALBERT's pre-training: MLM + sentence-order prediction (label 0 = A then B as written,
    1 = swapped). Same head as NSP, different data and output name (sop_logits)."""

    output_type = AlbertForPreTrainingOutput  # its pair logits field: sop_logits


class BertForSequenceClassification(BertPreTrainedModel):
    """[CLS] pooled -> dropout -> linear(num_labels). Loss as transformers' problem_type rules."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> SequenceClassifierOutput:
        pooled = self._bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                problem = ("regression" if self.config.num_labels == 1 else
                           "single_label_classification" if labels.dtype in (torch.long, torch.int) else
                           "multi_label_classification")
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BertForTokenClassification(BertPreTrainedModel):
    """Per-token labels (NER, POS): -100 marks positions the loss ignores (padding, non-first pieces)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> TokenClassifierOutput:
        x = self._bert(input_ids, attention_mask, token_type_ids, position_ids, pool=False).last_hidden_state
        logits = self.classifier(self.dropout(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels).float(), labels.view(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: start/end logits per token; positions outside the input are ignored by the loss."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None) -> QuestionAnsweringModelOutput:
        x = self._bert(input_ids, attention_mask, token_type_ids, position_ids, pool=False).last_hidden_state
        start_logits, end_logits = self.qa_outputs(x).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = qa_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


MODEL_CLASSES = {
    "BertModel": BertModel,
    "BertForMaskedLM": BertForMaskedLM,
    "BertForPreTraining": BertForPreTraining,
    "BertForPreTrainingSOP": BertForPreTrainingSOP,
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
}

__all__ = ["BertConfig", *MODEL_CLASSES]
