"""Builds BLIP-2 models from pretrained parts, initialised as the paper does.

Stage 1 (`build_stage1_model`): a pretrained vision encoder and a pretrained BERT. The Q-Former takes BERT's
hyper-parameters and weights: embeddings, and in every layer the self-attention and the feed-forward, which the
queries' feed-forward also starts from. The cross-attention blocks and the queries are new (normal with std
`initializer_range`); the ITG head starts from BERT's masked-LM head when there is one. BERT's token-type embeddings
and pooler have no place in the Q-Former and are dropped, as LAVIS drops them.

Stage 2 (`build_stage2_model`): a stage-1 model and a pretrained language model. The vision encoder, `vision_layernorm`,
the queries and the Q-Former's query path come from stage 1; the stage-1 text side (word/position embeddings, text
feed-forward, ITG head, ITC projections, ITM head, temperature) is dropped, as the original drops it in stage 2. The
language projection is new.
"""

import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .modeling_stage1 import Blip2BridgeModel
from .modeling_vision import vision_model_class
from .modeling_stage2 import Blip2BridgeForConditionalGeneration
from .processing.processing_blip2_bridge import add_image_token
from .weight_mapping import BERT_HYPERPARAMETERS, ITG_HEAD_MODULE_SOURCES, parameter_sources, qformer_module_sources


DEC_TOKEN = "[DEC]"

# Our tensors with one row per vocabulary entry: BERT's are shorter by the [DEC] row.
VOCABULARY_ROWS = ("qformer.word_embeddings.weight", "itg_head.decoder.bias")


def build_stage1_model(
    vision_model: str | os.PathLike | PreTrainedModel,
    text_model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    embed_dim: int = 256,
    vision_feature_layer: int | None = -2,
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
    num_query_tokens, cross_attention_frequency, embed_dim: as in the paper by default.
    vision_feature_layer: the tower's hidden state the Q-Former reads, before the tower's own final norm. Default -2,
        the penultimate layer's output, as the original: its EVA ViT-g keeps 39 of 40 blocks (LAVIS eva_vit.py
        `create_eva_vit_g`, depth=39) and its CLIP ViT-L 23 of 24 (clip_vit.py `create_clip_vit_L`, layers=23).
        -1 reads the last layer.
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


# ---- stage 2 ---------------------------------------------------------------------------------------------------

# Settings a stage-2 model keeps from its stage-1 model: the vision side and the Q-Former's shape.
STAGE1_SETTINGS = (
    "num_query_tokens",
    "vision_feature_layer",
    "vision_layer_norm_eps",
    "freeze_vision_model",
    "initializer_range",
)


def build_stage2_model(
    stage1_model: str | os.PathLike | Blip2BridgeModel,
    language_model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_token_id: int | None = None,
    instruction_aware: bool = False,
    **config_kwargs,
) -> Blip2BridgeForConditionalGeneration:
    """A stage-2 `Blip2BridgeForConditionalGeneration` from a stage-1 model and a pretrained language model.

    stage1_model: a `Blip2BridgeModel` or the path / hub id of a saved one. Its vision encoder, `vision_layernorm`,
        queries and Q-Former (query path) are copied; its text-side weights are not carried, unless
    instruction_aware: the Q-Former keeps its text side (word/position embeddings, text feed-forward, copied from
        stage 1 as InstructBLIP starts from BLIP-2's) and reads an instruction (`qformer_input_ids`) with the queries.
    language_model: a causal LM (`AutoModelForCausalLM`) or a seq2seq LM (`AutoModelForSeq2SeqLM`) with its LM head, or
        a path / hub id of one. It becomes the model's `language_model` as it is (not copied) and is frozen unless
        `freeze_language_model=False`. It may be quantised (`from_pretrained(..., quantization_config=
        BitsAndBytesConfig(load_in_4bit=True))`): its packed weights stay as they are, and the model gets the LLM's
        `is_loaded_in_4bit` / `is_loaded_in_8bit` flag (peft's QLoRA layers follow it).
    tokenizer: the LLM's tokenizer; modified in place: it gets the special token "<image>" if it lacks it, whose id
        becomes `config.image_token_id`. The LLM's embeddings grow when the tokenizer outgrows them.
    image_token_id: without a tokenizer, the placeholder id to use; default: a row appended to the LLM's embeddings.
    config_kwargs: further `Blip2BridgeConfig` settings (e.g. `freeze_language_model`).

    The language projection (Q-Former width -> LLM width) is new, initialised as transformers' BLIP-2 initialises it:
    normal weights with std `initializer_range`, zero bias. The model is returned in eval mode, as `from_pretrained`
    returns one.
    """
    # A stage-1 model the caller passed is copied from: training stage 2 must not change it.
    copy_tensors = isinstance(stage1_model, Blip2BridgeModel)
    if isinstance(stage1_model, (str, os.PathLike)):
        stage1_model = Blip2BridgeModel.from_pretrained(stage1_model)
    elif not isinstance(stage1_model, Blip2BridgeModel):
        raise TypeError(
            f"stage1_model is a {type(stage1_model).__name__}; expected a stage-1 Blip2BridgeModel or the path of one"
        )
    if isinstance(language_model, (str, os.PathLike)):
        language_model = load_language_model(language_model)
    image_token_id = add_image_token_to_language_model(language_model, tokenizer, image_token_id)
    config = stage2_config(
        stage1_model.config, language_model.config, image_token_id, instruction_aware=instruction_aware, **config_kwargs
    )
    return assemble_stage2_model(config, named_tensors(stage1_model), language_model, copy_tensors=copy_tensors)


def stage2_config(
    bridge_config: Blip2BridgeConfig,
    text_config: PreTrainedConfig,
    image_token_id: int | None,
    instruction_aware: bool = False,
    **config_kwargs,
) -> Blip2BridgeConfig:
    """The stage-2 configuration of a stage-1 configuration (vision side, queries, Q-Former) and an LLM's; the Q-Former
    reads text only when `instruction_aware` (InstructBLIP)."""
    settings = {name: getattr(bridge_config, name) for name in STAGE1_SETTINGS}
    return Blip2BridgeConfig(
        vision_config=bridge_config.vision_config,
        qformer_config={**bridge_config.qformer_config.to_dict(), "use_text_input": instruction_aware},
        text_config=text_config,
        image_token_id=image_token_id,
        **{**settings, **config_kwargs},
    )


def assemble_stage2_model(
    config: Blip2BridgeConfig,
    bridge_tensors: dict[str, torch.Tensor],
    language_model: PreTrainedModel,
    copy_tensors: bool = False,
) -> Blip2BridgeForConditionalGeneration:
    """A stage-2 model around `language_model` (taken as it is), its other tensors from `bridge_tensors`.

    bridge_tensors: our names -> tensors (e.g. a stage-1 model's); those without a place in the stage-2 model (the
        stage-1 text side) are left out. Every vision / query / Q-Former tensor must be there; the language projection
        is taken from them when present, else initialised fresh. They are used as they are unless `copy_tensors`.
    """
    check_language_model(language_model)
    # Built on the meta device: no memory and no initialisation for the parts that are replaced right after.
    with torch.device("meta"):
        model = Blip2BridgeForConditionalGeneration(config)
    model.language_model = language_model
    model.config.text_config = language_model.config
    if not any(name.startswith("language_projection.") for name in bridge_tensors):
        model.language_projection = nn.Linear(model.language_projection.in_features, language_model.config.hidden_size)
        model._init_weights(model.language_projection)

    ours = named_tensors(model)
    needed = {name for name, tensor in ours.items() if tensor.is_meta}
    missing = sorted(needed - set(bridge_tensors))
    if missing:
        raise ValueError(f"the stage-1 weights lack {len(missing)} tensors of the stage-2 model, e.g. {missing[:3]}")
    for name in needed:
        if bridge_tensors[name].shape != ours[name].shape:
            raise ValueError(
                f"{name} has shape {tuple(bridge_tensors[name].shape)}; the stage-2 model expects {tuple(ours[name].shape)}"
            )
    # Non-persistent buffers (e.g. CLIP's position ids) are not in state_dict(): set every tensor by name instead.
    for name in needed:
        module_name, _, tensor_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = bridge_tensors[name].detach()
        tensor = tensor.clone() if copy_tensors else tensor
        if tensor_name in module._parameters:
            module._parameters[tensor_name] = nn.Parameter(tensor)
        else:
            module._buffers[tensor_name] = tensor
    for parameter in model.parameters():
        # Floating-point only: a quantised LLM's (bitsandbytes) packed integer weights cannot take gradients.
        if parameter.is_floating_point():
            parameter.requires_grad_(True)
    model._freeze_frozen_modules()
    # A bitsandbytes LLM: flagged on the whole model as transformers flags the LLM, so that peft wraps its 4-bit /
    # 8-bit linears with its bitsandbytes LoRA layers (which merge) and Trainer skips DataParallel.
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(language_model, flag, False):
            setattr(model, flag, True)
    quantization = getattr(language_model.config, "quantization_config", None)
    if quantization is not None:
        model.config.quantization_config = quantization_of_llm_only(quantization, language_model)
    return model.eval()  # as from_pretrained returns a model; Trainer switches it to training


# What a quantised LLM's stage-2 model holds beside the LLM: saved and loaded in full precision.
NOT_QUANTISED_MODULES = ["vision_model", "vision_layernorm", "qformer", "language_projection"]


def quantization_of_llm_only(quantization, language_model: PreTrainedModel) -> dict:
    """The LLM's quantisation config for the whole stage-2 model: from_pretrained reads a top-level one before the
    text_config's, and with this one it quantises the LLM's linears again and nothing else. Without it, the LLM's
    config (saved in text_config) makes it quantise every linear, the tower's and the projection's included, whose
    saved weights are full precision."""
    config = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
    # What the LLM's own loading left unquantised (its LM head, by transformers' default), then the bridge.
    llm_skipped = getattr(getattr(language_model, "hf_quantizer", None), "modules_to_not_convert", None)
    skipped = list(config.get("llm_int8_skip_modules") or llm_skipped or [])
    config["llm_int8_skip_modules"] = skipped + [name for name in NOT_QUANTISED_MODULES if name not in skipped]
    return config


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def check_language_model(language_model: PreTrainedModel) -> None:
    if not isinstance(language_model, PreTrainedModel) or language_model.get_output_embeddings() is None:
        raise TypeError(
            f"language_model is a {type(language_model).__name__}; expected a language model with its LM head, as "
            "AutoModelForCausalLM or AutoModelForSeq2SeqLM builds it (e.g. OPTForCausalLM, T5ForConditionalGeneration)"
        )


def add_image_token_to_language_model(
    language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, image_token_id: int | None
) -> int:
    """The image placeholder id; the LLM's embeddings grow to hold it (and every token of the tokenizer)."""
    check_language_model(language_model)
    num_rows = language_model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None:
        if image_token_id is not None:
            raise ValueError(
                f"image_token_id={image_token_id} and a tokenizer were both given; the tokenizer's image token "
                "sets the id"
            )
        image_token_id = add_image_token(tokenizer)
        needed_rows = len(tokenizer)
    elif image_token_id is None:
        image_token_id, needed_rows = num_rows, num_rows + 1
    else:
        needed_rows = image_token_id + 1
    if needed_rows > num_rows:
        language_model.resize_token_embeddings(needed_rows)
    return image_token_id


def load_language_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """A causal or seq2seq LM checkpoint with its LM head, by what its config says it is."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return model_class.from_pretrained(path, config=config)


__all__ = ["build_stage1_model", "build_stage2_model"]
