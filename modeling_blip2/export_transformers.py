"""Exports our models to transformers' own BLIP-2 family formats; a stage-2 model to `Blip2ForConditionalGeneration`
(model_type "blip-2").

The weight names come from `BLIP2_KEY_MAPPING`, the table that loads transformers' checkpoints into ours: every
transformers name is mapped to ours with it, so the two directions cannot drift apart. transformers' BLIP-2 fixes two
things ours leaves open, and models outside them are refused:
- the vision tower is a `Blip2VisionModel` whose last layer's output passes one LayerNorm (its `post_layernorm`, our
  `vision_layernorm`): a model that reads an earlier layer (`vision_feature_layer=-2`, the original's choice) exports
  the tower cut after that layer, as the original's 39-block EVA ViT-g;
- the LLM is one `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` builds.
An instruction-aware model (its Q-Former reads text, `use_text_input=True`) exports to transformers' InstructBLIP
(`InstructBlipForConditionalGeneration`, or `InstructBlipVideoForConditionalGeneration`) with `export_to_instructblip`,
by `INSTRUCTBLIP_KEY_MAPPING`, under the same two constraints. A stage-1 model exports to transformers'
`Blip2ForImageTextRetrieval` (`export_stage1_to_transformers`, by `BLIP2_RETRIEVAL_KEY_MAPPING`), which holds its ITM
and ITC parts but no ITC temperature and no ITG head (left out with a warning). The tables live in
transformers_formats.py.
"""

import logging
import os
import re

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

from .modeling_stage1 import Blip2BridgeModel
from .modeling_stage2 import Blip2BridgeForConditionalGeneration
from .transformers_formats import (
    BLIP2_KEY_MAPPING,
    BLIP2_RETRIEVAL_KEY_MAPPING,
    INSTRUCTBLIP_KEY_MAPPING,
    NOT_IN_BLIP2_RETRIEVAL,
)
from .weight_mapping import BERT_HYPERPARAMETERS


logger = logging.getLogger(__name__)

# Our tensors with no counterpart: the vision tower's own final norm, which our features never pass.
UNEXPORTED = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")


def our_name_for(blip2_name: str, key_mapping: dict[str, str] = BLIP2_KEY_MAPPING) -> str:
    """The name of our tensor that a transformers BLIP-2 tensor loads from, by `BLIP2_KEY_MAPPING` (or the
    `key_mapping` given: `INSTRUCTBLIP_KEY_MAPPING` for an InstructBLIP tensor)."""
    for pattern, replacement in key_mapping.items():
        blip2_name = re.sub(pattern, replacement, blip2_name)
    return blip2_name


def check_exportable(model: Blip2BridgeForConditionalGeneration) -> None:
    """Refuses, naming the reason, a model that transformers' BLIP-2 cannot express."""
    if not isinstance(model, Blip2BridgeForConditionalGeneration):
        raise ValueError(
            f"model is a {type(model).__name__}; only a stage-2 Blip2BridgeForConditionalGeneration exports to "
            "transformers' Blip2ForConditionalGeneration (transformers has no stage-1 BLIP-2 with ITC/ITM/ITG heads)"
        )
    config = model.config
    check_vision_exportable(config)
    text_config_class = type(config.text_config)
    if text_config_class not in MODEL_FOR_CAUSAL_LM_MAPPING and text_config_class not in (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    ):
        raise ValueError(
            f"the language model is a {config.text_config.model_type!r} model, which neither AutoModelForCausalLM nor "
            "AutoModelForSeq2SeqLM builds; transformers' BLIP-2 builds its LLM with them"
        )


def check_vision_exportable(config) -> None:
    """Refuses, naming the reason, a vision side that transformers' BLIP-2 family cannot express."""
    if not isinstance(config.vision_config, Blip2VisionConfig):
        raise ValueError(
            f"the vision tower is a {config.vision_config.model_type!r} model; transformers' BLIP-2 holds a "
            "Blip2VisionModel ('blip_2_vision_model') only"
        )
    num_layers = config.vision_config.num_hidden_layers
    if config.vision_feature_layer is None or not -num_layers <= config.vision_feature_layer <= -1:
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer}; transformers' BLIP-2 reads the last layer's output "
            f"through one LayerNorm, so the export cuts the tower after the layer read: expected -1 to -{num_layers}"
        )


def exported_vision_config(config) -> dict:
    """The exported tower's config: cut after the layer the Q-Former reads, with a word when transformers' final norm
    gets another eps than our vision_layernorm has."""
    if config.vision_layer_norm_eps != config.vision_config.layer_norm_eps:
        # transformers' post_layernorm takes the vision layers' eps; ours has its own (the original's ln_vision).
        logger.warning(
            f"transformers' BLIP-2 gives its post_layernorm the vision layers' eps ({config.vision_config.layer_norm_eps})"
            f"; our vision_layernorm has eps {config.vision_layer_norm_eps}. The exported model uses the former, so its "
            "outputs differ from ours by about the size of that difference"
        )
    return {**config.vision_config.to_dict(), "num_hidden_layers": exported_vision_layers(config)}


def exported_qformer_config(qformer, **extra) -> dict:
    """transformers' Q-Former config fields of ours (BERT sizes, cross-attention frequency and width), plus `extra`."""
    return {
        **{name: getattr(qformer, name) for name in ("vocab_size", *BERT_HYPERPARAMETERS)},
        "cross_attention_frequency": qformer.cross_attention_frequency,
        "encoder_hidden_size": qformer.encoder_hidden_size,
        **extra,
    }


def exported_vision_layers(config) -> int:
    """How many vision layers the export keeps: those up to the one the Q-Former reads (hidden_states[layer])."""
    return config.vision_config.num_hidden_layers + 1 + config.vision_feature_layer


def blip2_config_for(model: Blip2BridgeForConditionalGeneration) -> Blip2Config:
    """transformers' `Blip2Config` of our stage-2 model (the inverse of `config_from_blip2`)."""
    config = model.config
    return Blip2Config(
        vision_config=exported_vision_config(config),
        qformer_config=exported_qformer_config(config.qformer_config),
        text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_index=config.image_token_id,
        initializer_range=config.initializer_range,
    )


def export_to_transformers(
    model: Blip2BridgeForConditionalGeneration,
    output_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Blip2ForConditionalGeneration:
    """Our stage-2 model as transformers' `Blip2ForConditionalGeneration`, saved to `output_dir` when given.

    The tokenizer (the LLM's, with its "<image>" token), when given, is saved beside it. An instruction-aware model
    (a Q-Former with `use_text_input=True`) exports as transformers' InstructBLIP instead (`export_to_instructblip`).
    """
    check_exportable(model)
    if model.config.qformer_config.use_text_input:
        return export_to_instructblip(model, output_dir, tokenizer=tokenizer)
    blip2_config = blip2_config_for(model)
    blip2 = _transformers_model_of(model, Blip2ForConditionalGeneration, blip2_config, BLIP2_KEY_MAPPING)
    if output_dir is not None:
        blip2.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return blip2


def _transformers_model_of(model, model_class, config, key_mapping: dict[str, str], not_in_format=()):
    """transformers' `model_class(config)` holding our model's tensors, each named through `key_mapping` (the table
    that loads that format into ours); every tensor of ours is exported except the unused vision norm, the vision
    layers past the one read and `not_in_format` (what the format has no place for)."""
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        their_names = list(model_class(config).state_dict())
    ours = model.state_dict()
    sources = {name: our_name_for(name, key_mapping) for name in their_names}
    missing = sorted(source for source in sources.values() if source not in ours)
    kept_layers = exported_vision_layers(model.config)
    cut_layers = {name for name in ours if (layer := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name))
                  and int(layer[1]) >= kept_layers}  # fmt: skip
    left_over = sorted(set(ours) - set(sources.values()) - set(UNEXPORTED) - cut_layers - set(not_in_format))
    if missing or left_over:  # a gap in the key mapping, not in the model
        raise RuntimeError(f"the key mapping leaves {missing[:3]} without a source and {left_over[:3]} unexported")

    theirs = model_class(config)
    theirs.load_state_dict({name: ours[source] for name, source in sources.items()}, strict=True)
    return theirs.to(model.dtype).eval()


def instructblip_config_for(
    model: Blip2BridgeForConditionalGeneration, video: bool = False
) -> InstructBlipConfig | InstructBlipVideoConfig:
    """transformers' `InstructBlipConfig` (or `InstructBlipVideoConfig` with `video`) of our instruction-aware model,
    the inverse of `config_from_instructblip`. The vision tower and LLM are exported as for BLIP-2."""
    config = model.config
    blip2_config = blip2_config_for(model)  # the vision tower cut after the layer read; the eps warning
    qformer = config.qformer_config
    config_class, token_name = (
        (InstructBlipVideoConfig, "video_token_index") if video else (InstructBlipConfig, "image_token_index")
    )
    return config_class(
        vision_config={k: v for k, v in blip2_config.vision_config.to_dict().items() if k != "model_type"},
        qformer_config=exported_qformer_config(qformer, pad_token_id=qformer.pad_token_id),
        text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        initializer_range=config.initializer_range,
        **{token_name: config.image_token_id},
    )


def export_to_instructblip(
    model: Blip2BridgeForConditionalGeneration,
    output_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    video: bool = False,
) -> InstructBlipForConditionalGeneration | InstructBlipVideoForConditionalGeneration:
    """Our instruction-aware stage-2 model (Q-Former with `use_text_input=True`) as transformers'
    `InstructBlipForConditionalGeneration`, or with `video=True` as `InstructBlipVideoForConditionalGeneration`
    (the same weights; `config.image_token_id` becomes its `video_token_index`), saved to `output_dir` when given.

    The weight names come from `INSTRUCTBLIP_KEY_MAPPING`, the table that loads those checkpoints into ours. The LLM's
    tokenizer, when given, is saved beside it; transformers' `InstructBlipProcessor` also needs the Q-Former's
    tokenizer (in `qformer_tokenizer/`) and `num_query_tokens`: save one with `InstructBlipProcessor(image_processor,
    tokenizer, qformer_tokenizer, num_query_tokens=...).save_pretrained(output_dir)`.
    """
    check_exportable(model)
    if not model.config.qformer_config.use_text_input:
        raise ValueError(
            "the Q-Former reads no instruction (qformer_config.use_text_input=False): transformers' InstructBLIP needs "
            "its word/position embeddings and text feed-forward; export this model with export_to_transformers (BLIP-2)"
        )
    model_class = InstructBlipVideoForConditionalGeneration if video else InstructBlipForConditionalGeneration
    theirs = _transformers_model_of(
        model, model_class, instructblip_config_for(model, video=video), INSTRUCTBLIP_KEY_MAPPING
    )
    if output_dir is not None:
        theirs.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return theirs


def blip2_retrieval_config_for(model: Blip2BridgeModel) -> Blip2Config:
    """transformers' `Blip2Config` of our stage-1 model (the inverse of `config_from_blip2_retrieval`); refuses, naming
    the reason, a model that transformers' BLIP-2 cannot express. Its text_config is transformers' default (an LLM
    that `Blip2ForImageTextRetrieval` never builds)."""
    if not isinstance(model, Blip2BridgeModel):
        raise ValueError(
            f"model is a {type(model).__name__}; only a stage-1 Blip2BridgeModel exports to transformers' "
            "Blip2ForImageTextRetrieval (a stage-2 model exports with export_to_transformers)"
        )
    config = model.config
    check_vision_exportable(config)
    qformer = config.qformer_config
    return Blip2Config(
        vision_config=exported_vision_config(config),
        # [DEC] and [SEP] are not read by transformers; kept so that loading the folder back gives our ids.
        qformer_config=exported_qformer_config(
            qformer, use_qformer_text_input=True, bos_token_id=qformer.bos_token_id, sep_token_id=qformer.sep_token_id
        ),
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.embed_dim,
        initializer_range=config.initializer_range,
    )


def export_stage1_to_transformers(
    model: Blip2BridgeModel,
    output_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Blip2ForImageTextRetrieval:
    """Our stage-1 model as transformers' `Blip2ForImageTextRetrieval` (the format of Salesforce/blip2-itm-vit-g),
    saved to `output_dir` when given, with the Q-Former's tokenizer beside it when given.

    Its ITM scores (`use_image_text_matching_head=True`) and ITC similarities (`use_image_text_matching_head=False`,
    not divided by a temperature) are ours. What that format cannot hold, the ITC temperature `temp` and the ITG head
    (captioning), is left out with a warning naming it; `Blip2BridgeModel.from_pretrained` of the folder initialises
    them afresh.
    """
    blip2_config = blip2_retrieval_config_for(model)
    tied = model.itg_head.decoder.weight is model.qformer.word_embeddings.weight
    logger.warning(
        f"transformers' Blip2ForImageTextRetrieval holds no ITC temperature and no ITG head: the export leaves out "
        f"temp (= {float(model.temp.detach()):g}; its ITC similarities are not divided by it) and the ITG head "
        f"({', '.join(name for name in NOT_IN_BLIP2_RETRIEVAL if name.startswith('itg_head'))}"
        f"{'' if tied else ', itg_head.decoder.weight (not tied to the word embeddings)'}). ITM and ITC scores are "
        "kept; keep the blip2-bridge folder for training and captioning"
    )

    # The ITG head's decoder weight is the word embeddings (tied), which the export holds.
    not_in_format = {*NOT_IN_BLIP2_RETRIEVAL, "itg_head.decoder.weight"}
    blip2 = _transformers_model_of(
        model, Blip2ForImageTextRetrieval, blip2_config, BLIP2_RETRIEVAL_KEY_MAPPING, not_in_format
    )
    if output_dir is not None:
        blip2.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return blip2


__all__ = ["export_to_transformers", "export_stage1_to_transformers", "export_to_instructblip"]
