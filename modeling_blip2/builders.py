"""Builds a stage-1 BLIP-2 model from a pretrained vision encoder and a pretrained BERT, initialised as the paper does.

The Q-Former takes BERT's hyper-parameters and weights: embeddings, and in every layer the self-attention and the
feed-forward, which the queries' feed-forward also starts from. The cross-attention blocks and the queries are new
(normal with std `initializer_range`); the ITG head starts from BERT's masked-LM head when there is one. BERT's
token-type embeddings and pooler have no place in the Q-Former and are dropped, as LAVIS drops them.
"""

import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .modeling_blip2_bridge import Blip2BridgeModel, vision_model_class
from .weight_mapping import ITG_HEAD_MODULE_SOURCES, parameter_sources, qformer_module_sources


DEC_TOKEN = "[DEC]"

# BERT's hyper-parameters that the Q-Former takes over unchanged.
BERT_HYPERPARAMETERS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)

# Our tensors with one row per vocabulary entry: BERT's are shorter by the [DEC] row.
VOCABULARY_ROWS = ("qformer.word_embeddings.weight", "itg_head.decoder.bias")


def build_stage1_model(
    vision_model: str | os.PathLike | PreTrainedModel,
    text_model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    embed_dim: int = 256,
    vision_feature_layer: int | None = -1,
    **config_kwargs,
) -> Blip2BridgeModel:
    """A stage-1 `Blip2BridgeModel` from a pretrained vision encoder and a pretrained BERT.

    vision_model: a vision model `AutoModel` builds (CLIPVisionModel, Blip2VisionModel, ViTModel, Dinov2Model, ...), a
        composite model holding one as `vision_model` (CLIPModel, ...), or a path / hub id of either. Its weights are
        copied in and frozen (unless `freeze_vision_model=False`).
    text_model: a BertModel, BertForMaskedLM or BertLMHeadModel, or a path / hub id of one.
    tokenizer: the Q-Former's tokenizer; modified in place: it gets "[DEC]" as its bos token if it has none, and the
        word embeddings grow to its length. Without one, one row is appended and its id (BERT's vocabulary size, 30522
        for bert-base) is the [DEC] id.
    num_query_tokens, cross_attention_frequency, embed_dim, vision_feature_layer: as in the paper by default.
    config_kwargs: further `Blip2BridgeConfig` settings (e.g. `initial_temperature`, `freeze_vision_model`).
    """
    if isinstance(vision_model, (str, os.PathLike)):
        vision_model = load_vision_model(vision_model)
    if getattr(vision_model.config, "vision_config", None) is not None:
        vision_model = vision_model.vision_model
    if isinstance(text_model, (str, os.PathLike)):
        text_model = load_text_model(text_model)
    bert = text_model if isinstance(text_model, BertModel) else getattr(text_model, "bert", None)
    if not isinstance(bert, BertModel):
        raise TypeError(
            f"text_model is a {type(text_model).__name__}; expected a BERT model (BertModel, BertForMaskedLM or "
            "BertLMHeadModel), whose layout the Q-Former takes over"
        )
    has_lm_head = hasattr(getattr(text_model, "cls", None), "predictions")

    bert_vocab_size = bert.get_input_embeddings().weight.shape[0]
    if tokenizer is None:
        dec_token_id, vocab_size = bert_vocab_size, bert_vocab_size + 1
    else:
        dec_token_id = add_dec_token(tokenizer)
        # Never fewer rows than BERT: some checkpoints pad their table past the tokenizer.
        vocab_size = max(bert_vocab_size, len(tokenizer))

    qformer_kwargs = {name: getattr(bert.config, name) for name in BERT_HYPERPARAMETERS}
    if tokenizer is not None:
        qformer_kwargs["sep_token_id"] = tokenizer.sep_token_id  # otherwise BERT's [SEP], the config's default
    qformer_config = Blip2BridgeQFormerConfig(
        **qformer_kwargs,
        vocab_size=vocab_size,
        bos_token_id=dec_token_id,
        cross_attention_frequency=cross_attention_frequency,
    )
    config = Blip2BridgeConfig(
        vision_config=vision_model.config,
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        embed_dim=embed_dim,
        vision_feature_layer=vision_feature_layer,
        **{"initializer_range": bert.config.initializer_range, **config_kwargs},
    )
    model = Blip2BridgeModel(config)

    model_names = list(model.state_dict())
    with torch.no_grad():
        copy_vision_weights(model.vision_model, vision_model)
        qformer_sources = parameter_sources(
            qformer_module_sources(bert.config.num_hidden_layers, cross_attention_frequency, from_lavis_qformer=False),
            model_names,
            target_prefix="qformer.",
        )
        copy_weights(model, bert.state_dict(), qformer_sources)
        if has_lm_head:
            head_sources = parameter_sources(ITG_HEAD_MODULE_SOURCES, model_names)
            head_sources["itg_head.decoder.bias"] = "cls.predictions.bias"
            copy_weights(model, text_model.state_dict(), head_sources)
        # The [DEC] row (and any other new row) starts like every embedding row; its decoder bias stays 0.
        nn.init.normal_(model.qformer.word_embeddings.weight[bert_vocab_size:], std=qformer_config.initializer_range)
    return model


def copy_vision_weights(ours: nn.Module, vision_model: PreTrainedModel) -> None:
    incompatible = ours.load_state_dict(vision_model.state_dict(), strict=False)
    # A model built without its pooler (ViTModel(add_pooling_layer=False)) is fine: the Q-Former reads hidden states.
    missing = [key for key in incompatible.missing_keys if not key.startswith("pooler.")]
    if missing or incompatible.unexpected_keys:
        raise ValueError(
            f"the {type(vision_model).__name__}'s weights do not fit the {type(ours).__name__} that AutoModel builds "
            f"from its config: missing {missing[:3]}, unexpected {incompatible.unexpected_keys[:3]}"
        )


def copy_weights(model: nn.Module, source_weights: dict[str, torch.Tensor], sources: dict[str, str]) -> None:
    """Copies `source_weights[sources[name]]` into each of the model's tensors `name`.

    Vocabulary-sized tensors may be longer than the source (new rows); they receive its rows first.
    """
    our_weights = model.state_dict()
    for name, source in sources.items():
        target, weight = our_weights[name], source_weights[source]
        if name in VOCABULARY_ROWS and target.shape[0] > weight.shape[0] and target.shape[1:] == weight.shape[1:]:
            target = target[: weight.shape[0]]
        if target.shape != weight.shape:
            raise ValueError(f"{source} has shape {tuple(weight.shape)}; {name} expects {tuple(target.shape)}")
        target.copy_(weight)


def add_dec_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The [DEC] id: the tokenizer's bos token, which becomes "[DEC]" when it has none (as LAVIS's tokenizer)."""
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer.bos_token_id


def load_vision_model(path: str | os.PathLike) -> PreTrainedModel:
    """The vision tower of a checkpoint: a vision model's, or the vision part of a composite one (CLIP, BLIP-2, ...)."""
    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None) or config
    return vision_model_class(vision_config).from_pretrained(path)


def load_text_model(path: str | os.PathLike) -> PreTrainedModel:
    """A BERT checkpoint with its masked-LM head, or its bare encoder when the checkpoint has no head."""
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, BertConfig):
        raise TypeError(f"{path} holds a {config.model_type!r} model; expected a BERT checkpoint")
    model, loading_info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    head_missing = any(key.startswith("cls.predictions.transform.") for key in loading_info["missing_keys"])
    return model.bert if head_missing else model


__all__ = ["build_stage1_model"]
