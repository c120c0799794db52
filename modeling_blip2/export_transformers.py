"""Exports a stage-2 model to transformers' own BLIP-2 format (`Blip2ForConditionalGeneration`, model_type "blip-2").

The weight names come from `BLIP2_KEY_MAPPING`, the table that loads transformers' checkpoints into ours: every
transformers name is mapped to ours with it, so the two directions cannot drift apart. transformers' BLIP-2 fixes two
things ours leaves open, and models outside them are refused:
- the vision tower is a `Blip2VisionModel` whose last layer's output passes one LayerNorm (its `post_layernorm`, our
  `vision_layernorm`): a model that reads an earlier layer (`vision_feature_layer=-2`, the original's choice) exports
  the tower cut after that layer, as the original's 39-block EVA ViT-g;
- the LLM is one `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` builds.
"""

import logging
import os
import re

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

from .modeling_stage2 import BLIP2_KEY_MAPPING, Blip2BridgeForConditionalGeneration
from .weight_mapping import BERT_HYPERPARAMETERS


logger = logging.getLogger(__name__)

# Our tensors with no counterpart: the vision tower's own final norm, which our features never pass.
UNEXPORTED = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")


def our_name_for(blip2_name: str) -> str:
    """The name of our tensor that a transformers BLIP-2 tensor loads from, by `BLIP2_KEY_MAPPING`."""
    for pattern, replacement in BLIP2_KEY_MAPPING.items():
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
    text_config_class = type(config.text_config)
    if text_config_class not in MODEL_FOR_CAUSAL_LM_MAPPING and text_config_class not in (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    ):
        raise ValueError(
            f"the language model is a {config.text_config.model_type!r} model, which neither AutoModelForCausalLM nor "
            "AutoModelForSeq2SeqLM builds; transformers' BLIP-2 builds its LLM with them"
        )


def exported_vision_layers(config) -> int:
    """How many vision layers the export keeps: those up to the one the Q-Former reads (hidden_states[layer])."""
    return config.vision_config.num_hidden_layers + 1 + config.vision_feature_layer


def blip2_config_for(model: Blip2BridgeForConditionalGeneration) -> Blip2Config:
    """transformers' `Blip2Config` of our stage-2 model (the inverse of `config_from_blip2`)."""
    config = model.config
    vision_config = {**config.vision_config.to_dict(), "num_hidden_layers": exported_vision_layers(config)}
    if config.vision_layer_norm_eps != config.vision_config.layer_norm_eps:
        # transformers' post_layernorm takes the vision layers' eps; ours has its own (the original's ln_vision).
        logger.warning(
            f"transformers' BLIP-2 gives its post_layernorm the vision layers' eps ({config.vision_config.layer_norm_eps})"
            f"; our vision_layernorm has eps {config.vision_layer_norm_eps}. The exported model uses the former, so its "
            "outputs differ from ours by about the size of that difference"
        )
    qformer = config.qformer_config
    return Blip2Config(
        vision_config=vision_config,
        qformer_config={
            **{name: getattr(qformer, name) for name in ("vocab_size", *BERT_HYPERPARAMETERS)},
            "cross_attention_frequency": qformer.cross_attention_frequency,
            "encoder_hidden_size": qformer.encoder_hidden_size,
        },
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

    The tokenizer (the LLM's, with its "<image>" token), when given, is saved beside it.
    """
    check_exportable(model)
    blip2_config = blip2_config_for(model)
    blip2_config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        blip2_names = list(Blip2ForConditionalGeneration(blip2_config).state_dict())
    ours = model.state_dict()
    sources = {name: our_name_for(name) for name in blip2_names}
    missing = sorted(source for source in sources.values() if source not in ours)
    kept_layers = exported_vision_layers(model.config)
    cut_layers = {name for name in ours if (layer := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name))
                  and int(layer[1]) >= kept_layers}  # fmt: skip
    left_over = sorted(set(ours) - set(sources.values()) - set(UNEXPORTED) - cut_layers)
    if missing or left_over:  # a gap in BLIP2_KEY_MAPPING, not in the model
        raise RuntimeError(f"BLIP2_KEY_MAPPING leaves {missing[:3]} without a source and {left_over[:3]} unexported")

    blip2 = Blip2ForConditionalGeneration(blip2_config)
    blip2.load_state_dict({name: ours[source] for name, source in sources.items()}, strict=True)
    blip2 = blip2.to(model.dtype).eval()
    if output_dir is not None:
        blip2.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return blip2


__all__ = ["export_to_transformers"]
