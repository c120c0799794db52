"""Converts original LAVIS BLIP-2 checkpoints: stage 1 (`blip2`, `blip2_feature_extractor`) to a `Blip2BridgeModel`,
stage 2 (`blip2_opt`, `blip2_t5`) and InstructBLIP (`blip2_vicuna_instruct`, `blip2_t5_instruct`) to a
`Blip2BridgeForConditionalGeneration`.

A LAVIS checkpoint is a `.pth` file `{"model": state_dict, ...}` whose state dict holds
- `visual_encoder.*`: the frozen image encoder, EVA ViT-g (`lavis/models/eva_vit.py`) or CLIP ViT-L
  (`lavis/models/clip_vit.py`). LAVIS's runner leaves frozen parameters out when it saves a checkpoint, so the
  tower's own file (LAVIS's `eva_vit_g.pth` or `clip_vit_L.pth`) may have to provide them;
- `ln_vision.*`, `Qformer.bert.*`, `query_tokens`;
- stage 1: `Qformer.cls.*`, `vision_proj.*`, `text_proj.*`, `itm_head.*`, `temp`;
- stage 2: `opt_proj.*` or `t5_proj.*`, the language projection. The stage-2 models set the Q-Former's text side to
  None (`Qformer.cls`, word/position embeddings, every layer's text feed-forward `intermediate`/`output`), so it is not
  in the file, and the frozen LLM (`opt_model.*` / `t5_model.*`) is usually not either: it comes from its own
  pretrained checkpoint (`language_model`). LLM tensors that the file does hold replace the pretrained ones.
- InstructBLIP (`blip2_vicuna_instruct`: `llm_proj.*`, LLM `llm_model.*`; `blip2_t5_instruct`: `t5_proj.*`, LLM
  `t5_model.*`): as stage 2, but the Q-Former keeps its text side except `Qformer.cls` (word/position embeddings and
  every layer's text feed-forward), since it reads the instruction with the queries. Such a checkpoint converts to a
  stage-2 model whose Q-Former is built with `use_text_input=True` (`qformer_input_ids` in forward/generate).

Files are read with `torch.load(..., weights_only=True)`: a checkpoint can hold tensors, never code.

Both towers, as LAVIS builds them, stop one block short of the released encoder (EVA ViT-g keeps 39 of its 40 blocks,
CLIP ViT-L 23 of its 24) and have no final LayerNorm: `ln_vision` plays that role. Blocks past the tower's depth are
ignored, as LAVIS's non-strict `load_state_dict` ignores them. The converted model reads `vision_feature_layer=-1`,
the last block's output before the vision model's `post_layernorm`; that norm has no counterpart, is never applied to
the features, and is saved as ones/zeros.
"""

import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .builders import add_image_token_to_language_model, assemble_stage2_model, load_language_model, stage2_config
from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .modeling_stage1 import Blip2BridgeModel, non_finite_kind
from .modeling_stage2 import Blip2BridgeForConditionalGeneration
from .processing.end_of_text import default_end_of_text, end_of_text_ids
from .weight_mapping import ITG_HEAD_MODULE_SOURCES, parameter_sources, qformer_module_sources


logger = logging.getLogger(__name__)

VISION_PREFIX = "visual_encoder."
QFORMER_PREFIX = "Qformer."

# What the shapes cannot tell about LAVIS's towers (heads, eps, activation, image size, depth).
VISION_PRESETS = {
    # lavis/models/eva_vit.py::create_eva_vit_g: depth 39, 1408 // 88 = 16 heads, int(1408 * 4.3637) = 6144 MLP
    # units, LayerNorm eps 1e-6, exact GELU, q and v biases (k has none).
    "eva_clip_g": {
        "model_type": "blip_2_vision_model",
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
    },
    # lavis/models/clip_vit.py::create_clip_vit_L: 23 residual blocks of width 1024, 16 heads, 4x MLP with QuickGELU,
    # torch's LayerNorm eps 1e-5, `ln_pre` before the blocks, no `ln_post`.
    "clip_L": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    },
}

@dataclass(frozen=True)
class LavisStage2Model:
    """A LAVIS stage-2 model: where its projection and LLM live in the state dict, and how it configures the LLM."""

    name: str
    projection_prefix: str
    language_model_prefix: str
    # LAVIS's blip2_t5 runs FlanT5 with exact GELU (`t5_config.dense_act_fn = "gelu"`), not the checkpoint's gelu_new.
    language_model_config: tuple[tuple[str, object], ...] = ()
    # InstructBLIP: the Q-Former reads the instruction with the queries (`qformer_text_input=True`, LAVIS's default),
    # so the checkpoint keeps the Q-Former's text side; without it, the queries read the image only.
    instruction_aware: bool = False
    # Special tokens LAVIS gives the LLM's tokenizer, in its order, before resizing the LLM's embeddings to it.
    tokenizer_special_tokens: tuple[tuple[str, str], ...] = ()


T5_GELU = (("dense_act_fn", "gelu"),)
LAVIS_STAGE2_MODELS = (
    LavisStage2Model("blip2_opt", "opt_proj.", "opt_model."),
    LavisStage2Model("blip2_t5", "t5_proj.", "t5_model.", language_model_config=T5_GELU),
    # Blip2VicunaInstruct.__init__: pad "[PAD]" (a new row), and "</s>" as bos, eos and unk: its prompts start with
    # "</s>", not Llama's "<s>".
    LavisStage2Model(
        "blip2_vicuna_instruct",
        "llm_proj.",
        "llm_model.",
        instruction_aware=True,
        tokenizer_special_tokens=(
            ("pad_token", "[PAD]"), ("bos_token", "</s>"), ("eos_token", "</s>"), ("unk_token", "</s>")
        ),
    ),  # fmt: skip
    # Blip2T5Instruct names its tensors as Blip2T5 does; its checkpoints differ by the Q-Former's text side.
    LavisStage2Model(
        "blip2_t5_instruct", "t5_proj.", "t5_model.", language_model_config=T5_GELU, instruction_aware=True
    ),
)
QFORMER_WORD_EMBEDDINGS = "Qformer.bert.embeddings.word_embeddings.weight"
# The stage-1 text side, which LAVIS's stage-2 models drop.
QFORMER_TEXT_SIDE = re.compile(
    r"Qformer\.(cls\.|bert\.embeddings\.(word|position)_embeddings\.|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)

# LAVIS's ITG decoder shares these tensors (BertLMPredictionHead ties them) and saves them twice.
TIED_COPIES = {
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}

# LAVIS's Q-Former config is BERT's config.json plus these names.
LAVIS_BERT_KEY_NAMES = {"cross_attention_freq": "cross_attention_frequency"}
# Q-Former settings a config file cannot override: LAVIS resizes BERT's vocabulary to its tokenizer (so the checkpoint
# tells the size), the cross-attention width is the vision width, and stage 1 always reads text.
QFORMER_SETTINGS_FROM_CHECKPOINT = {"vocab_size", "encoder_hidden_size", "use_text_input"}


# ---- how checkpoint tensors become ours -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """Makes our tensors from checkpoint tensors; `source_shapes` says which checkpoint shapes our shapes require."""

    source_shapes: Callable[[list[tuple[int, ...]]], list[tuple[int, ...]]]
    apply: Callable[[list[torch.Tensor], list[tuple[int, ...]]], list[torch.Tensor]]


COPY = Transform(source_shapes=lambda target_shapes: target_shapes, apply=lambda tensors, target_shapes: tensors)

# One fused tensor split along dim 0 into several of ours: torch's MultiheadAttention `in_proj_*` (CLIP) holds the
# query, key and value projections stacked.
SPLIT_ROWS = Transform(
    source_shapes=lambda target_shapes: [(sum(shape[0] for shape in target_shapes), *target_shapes[0][1:])],
    apply=lambda tensors, target_shapes: list(torch.split(tensors[0], [shape[0] for shape in target_shapes])),
)

# EVA's attention has q and v biases and no k bias; it adds cat(q_bias, 0, v_bias) to its fused qkv projection.
EVA_QKV_BIAS = Transform(
    source_shapes=lambda target_shapes: [(target_shapes[0][0] // 3,)] * 2,
    apply=lambda tensors, target_shapes: [torch.cat([tensors[0], torch.zeros_like(tensors[1]), tensors[1]])],
)

# LAVIS's 0-d ITC temperature becomes our 1-element vector.
SCALAR_TO_VECTOR = Transform(
    source_shapes=lambda target_shapes: [()],
    apply=lambda tensors, target_shapes: [tensors[0].reshape(target_shapes[0])],
)


@dataclass(frozen=True)
class WeightRule:
    """Our tensors `targets` are made from the checkpoint tensors `sources` by `transform`."""

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    transform: Transform = COPY


def copy_rule(target: str, source: str) -> WeightRule:
    return WeightRule((target,), (source,))


def with_prefixes(rule: WeightRule, target_prefix: str, source_prefix: str) -> WeightRule:
    return WeightRule(
        tuple(target_prefix + name for name in rule.targets),
        tuple(source_prefix + name for name in rule.sources),
        rule.transform,
    )


def copy_module_rules(target_module: str, source_module: str) -> list[WeightRule]:
    """A linear or LayerNorm module's weight and bias."""
    return [copy_rule(f"{target_module}.{name}", f"{source_module}.{name}") for name in ("weight", "bias")]


# ---- the two vision towers ---------------------------------------------------------------------------------------


def eva_vit_rules(config: PreTrainedConfig) -> list[WeightRule]:
    """LAVIS's EVA ViT (timm/BEiT names) -> transformers' `Blip2VisionModel`; names relative to each tower."""
    rules = [
        copy_rule("embeddings.class_embedding", "cls_token"),
        copy_rule("embeddings.position_embedding", "pos_embed"),
        *copy_module_rules("embeddings.patch_embedding", "patch_embed.proj"),
    ]
    for layer_idx in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer_idx}", f"blocks.{layer_idx}"
        rules += copy_module_rules(f"{ours}.layer_norm1", f"{theirs}.norm1")
        rules.append(copy_rule(f"{ours}.self_attn.qkv.weight", f"{theirs}.attn.qkv.weight"))
        if config.qkv_bias:
            biases = (f"{theirs}.attn.q_bias", f"{theirs}.attn.v_bias")
            rules.append(WeightRule((f"{ours}.self_attn.qkv.bias",), biases, EVA_QKV_BIAS))
        rules += copy_module_rules(f"{ours}.self_attn.projection", f"{theirs}.attn.proj")
        rules += copy_module_rules(f"{ours}.layer_norm2", f"{theirs}.norm2")
        rules += copy_module_rules(f"{ours}.mlp.fc1", f"{theirs}.mlp.fc1")
        rules += copy_module_rules(f"{ours}.mlp.fc2", f"{theirs}.mlp.fc2")
    return rules


def clip_vit_rules(config: PreTrainedConfig) -> list[WeightRule]:
    """LAVIS's CLIP ViT (OpenAI names) -> transformers' `CLIPVisionModel`; names relative to each tower."""
    rules = [
        copy_rule("embeddings.class_embedding", "class_embedding"),
        copy_rule("embeddings.position_embedding.weight", "positional_embedding"),
        copy_rule("embeddings.patch_embedding.weight", "conv1.weight"),  # no bias on either side
        *copy_module_rules("pre_layrnorm", "ln_pre"),  # sic: transformers' name
    ]
    for layer_idx in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer_idx}", f"transformer.resblocks.{layer_idx}"
        for parameter in ("weight", "bias"):
            projections = tuple(f"{ours}.self_attn.{name}_proj.{parameter}" for name in ("q", "k", "v"))
            rules.append(WeightRule(projections, (f"{theirs}.attn.in_proj_{parameter}",), SPLIT_ROWS))
        rules += copy_module_rules(f"{ours}.self_attn.out_proj", f"{theirs}.attn.out_proj")
        rules += copy_module_rules(f"{ours}.layer_norm1", f"{theirs}.ln_1")
        rules += copy_module_rules(f"{ours}.layer_norm2", f"{theirs}.ln_2")
        rules += copy_module_rules(f"{ours}.mlp.fc1", f"{theirs}.mlp.c_fc")
        rules += copy_module_rules(f"{ours}.mlp.fc2", f"{theirs}.mlp.c_proj")
    return rules


@dataclass(frozen=True)
class VisionLayout:
    """How one LAVIS vision tower names its weights, and the transformers model that reproduces it."""

    name: str
    default_preset: str
    model_type: str
    block_pattern: re.Pattern  # matches a block's weights, capturing the block index
    rules: Callable[[PreTrainedConfig], list[WeightRule]]
    # Parts of the released encoder file that LAVIS's tower does not build (final norms, heads, projections).
    unbuilt_modules: tuple[str, ...]


VISION_LAYOUTS = (
    VisionLayout(
        name="EVA ViT",
        default_preset="eva_clip_g",
        model_type="blip_2_vision_model",
        block_pattern=re.compile(r"blocks\.(\d+)\."),
        rules=eva_vit_rules,
        unbuilt_modules=("norm.", "fc_norm.", "head."),
    ),
    VisionLayout(
        name="CLIP ViT",
        default_preset="clip_L",
        model_type="clip_vision_model",
        block_pattern=re.compile(r"transformer\.resblocks\.(\d+)\."),
        rules=clip_vit_rules,
        unbuilt_modules=("ln_post.", "proj"),
    ),
)


def vision_layout_of(state_dict: Mapping[str, torch.Tensor]) -> VisionLayout:
    """The layout of the checkpoint's `visual_encoder.*` weights."""
    vision_keys = [key[len(VISION_PREFIX) :] for key in state_dict if key.startswith(VISION_PREFIX)]
    if not vision_keys:
        raise ValueError(
            "the checkpoint has no visual_encoder.* weights: LAVIS's runner leaves the frozen image encoder out when "
            "it saves. Pass the tower's own weights (LAVIS's eva_vit_g.pth or clip_vit_L.pth) as vision_checkpoint "
            "(--vision-checkpoint on the command line)"
        )
    for layout in VISION_LAYOUTS:
        if any(layout.block_pattern.match(key) for key in vision_keys):
            return layout
    layout_names = ", ".join(layout.name for layout in VISION_LAYOUTS)
    raise ValueError(
        f"visual_encoder.* has neither of the layouts LAVIS uses ({layout_names}); its first keys are "
        f"{sorted(vision_keys)[:5]}"
    )


# ---- reading checkpoints ----------------------------------------------------------------------------------------


def load_lavis_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS `.pth` file (`{"model": state_dict, ...}` or a bare state dict), tensors only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects other than tensors and plain containers. It is read with "
            f"torch.load(weights_only=True), which never runs code from the file, and that refused it: {error}"
        ) from error
    except (EOFError, RuntimeError, KeyError, IndexError) as error:
        # What torch.load raises on an empty, truncated or non-checkpoint file ("EOFError", "failed finding central
        # directory", a KeyError from the legacy reader, ...): none of it says which file or what was expected.
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} ({size} bytes) is not a readable PyTorch checkpoint: empty, truncated or another kind of file "
            f"({type(error).__name__}: {str(error)[:120] or 'no detail'}); expected a LAVIS .pth file"
        ) from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__}; expected a state dict or {{'model': state_dict}}"
        )
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}; expected a tensor")
        refuse_non_finite_tensor(path, key, value)
    return state_dict


def refuse_non_finite_tensor(path: str | os.PathLike, key: str, tensor: torch.Tensor) -> None:
    """A NaN or inf weight would make every output NaN, and only surface later, far from the checkpoint."""
    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if finite.all():
        return
    raise ValueError(
        f"{path}: tensor {key!r} holds {non_finite_kind(tensor)} ({int((~finite).sum())} of {tensor.numel()} "
        "values); the checkpoint is damaged or was saved after training diverged. Convert one from before that"
    )


def with_vision_weights(
    state_dict: Mapping[str, torch.Tensor], vision_state_dict: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The checkpoint with a separate vision tower file (e.g. LAVIS's `eva_vit_g.pth`) added under `visual_encoder.`."""
    state_dict = dict(state_dict)
    if vision_state_dict is None:
        return state_dict
    if any(key.startswith(VISION_PREFIX) for key in state_dict):
        raise ValueError(
            "the checkpoint already holds visual_encoder.* weights; a separate vision checkpoint would clash"
        )
    for key, value in vision_state_dict.items():
        state_dict[key if key.startswith(VISION_PREFIX) else VISION_PREFIX + key] = value
    return state_dict


def keeps_qformer_text_side(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint is of a Q-Former that reads text in stage 2: word embeddings present, and no ITG head
    (`Qformer.cls`), which every stage-2 model drops and a stage-1 Q-Former saved whole would hold."""
    return QFORMER_WORD_EMBEDDINGS in state_dict and not any(key.startswith("Qformer.cls.") for key in state_dict)


def reads_instruction(state_dict: Mapping[str, torch.Tensor], stage2_model: LavisStage2Model | None) -> bool:
    """Whether the converted Q-Former reads an instruction: an InstructBLIP checkpoint that keeps its text side."""
    return stage2_model is not None and stage2_model.instruction_aware and keeps_qformer_text_side(state_dict)


def lavis_stage2_model_of(state_dict: Mapping[str, torch.Tensor]) -> LavisStage2Model | None:
    """The LAVIS stage-2 model whose projection the checkpoint holds, or None for a stage-1 checkpoint."""
    found = [
        model
        for model in LAVIS_STAGE2_MODELS
        if any(key.startswith((model.projection_prefix, model.language_model_prefix)) for key in state_dict)
    ]
    # blip2_t5 and blip2_t5_instruct name their tensors alike: the instruct model's Q-Former keeps its text side.
    # (Blip2T5Instruct built with qformer_text_input=False computes what Blip2T5 computes.)
    text_side = keeps_qformer_text_side(state_dict)
    found = [
        model
        for model in found
        if model.instruction_aware == text_side
        or not any(other is not model and other.projection_prefix == model.projection_prefix for other in found)
    ]
    if len(found) > 1:
        described = []
        for model in found:
            prefixes = (model.projection_prefix, model.language_model_prefix)
            key = min(key for key in state_dict if key.startswith(prefixes))
            kind = "an InstructBLIP" if model.instruction_aware else "a BLIP-2"
            described.append(f"{key!r}: {kind} checkpoint ({model.name})")
        raise ValueError(
            f"the checkpoint holds {' and '.join(described)}; a checkpoint holds the tensors of one model"
        )
    return found[0] if found else None


def split_language_model_weights(
    state_dict: Mapping[str, torch.Tensor], stage2_model: LavisStage2Model
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the rest, the LLM's tensors under the LLM's own names)."""
    prefix = stage2_model.language_model_prefix
    language_model = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return {key: value for key, value in state_dict.items() if not key.startswith(prefix)}, language_model


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


# ---- configuration ----------------------------------------------------------------------------------------------


def vision_config_for(vision, layout: VisionLayout) -> PreTrainedConfig:
    """A transformers vision config from a preset name, a JSON file, a dict or a config, checked against the layout."""
    if vision is None:
        vision = layout.default_preset
    if isinstance(vision, PreTrainedConfig):
        config = vision
    else:
        if isinstance(vision, Mapping):
            config_dict = dict(vision)
        elif vision in VISION_PRESETS:
            config_dict = VISION_PRESETS[vision]
        elif Path(vision).is_file():
            config_dict = read_json(vision)
        else:
            raise ValueError(f"vision={vision!r} is neither a preset ({', '.join(VISION_PRESETS)}) nor a JSON file")
        # A composite model's config.json (e.g. transformers' BLIP-2 or CLIP) holds the vision part under vision_config.
        config_dict = dict(config_dict.get("vision_config", config_dict))
        if "model_type" not in config_dict:
            raise ValueError(f"the vision config {config_dict} has no model_type; expected {layout.model_type!r}")
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    if config.model_type != layout.model_type:
        raise ValueError(
            f"the checkpoint's visual_encoder is an {layout.name}, which converts to a {layout.model_type!r} config; "
            f"the vision config given is a {config.model_type!r}"
        )
    return config


def qformer_config_kwargs(qformer_config) -> dict:
    """Q-Former settings from a BERT-style dict, JSON file or config (LAVIS names accepted); other keys are dropped."""
    if qformer_config is None:
        return {}
    if isinstance(qformer_config, PreTrainedConfig):
        qformer_config = qformer_config.to_dict()
    elif not isinstance(qformer_config, Mapping):
        qformer_config = read_json(qformer_config)
    settings = set(Blip2BridgeQFormerConfig.__annotations__) - QFORMER_SETTINGS_FROM_CHECKPOINT
    kwargs = {}
    for key, value in qformer_config.items():
        key = LAVIS_BERT_KEY_NAMES.get(key, key)
        if key == "position_embedding_type" and value != "absolute":
            raise ValueError(f"position_embedding_type={value!r}; the Q-Former has absolute position embeddings only")
        if key in settings:
            kwargs[key] = value
    return kwargs


def check_language_model_given(stage2_model: LavisStage2Model | None, language_model_given: bool) -> None:
    """A stage-2 checkpoint needs its LLM; a stage-1 checkpoint has none."""
    if stage2_model is None and language_model_given:
        raise ValueError(
            "a language model was given, but this is a stage-1 checkpoint (no opt_proj.*, t5_proj.* or llm_proj.*), "
            "which has none"
        )
    if stage2_model is not None and not language_model_given:
        raise ValueError(
            f"this is a {stage2_model.name} (stage-2) checkpoint: its frozen LLM comes from its own pretrained "
            "checkpoint; pass it as language_model (--language-model on the command line)"
        )


def check_ranks(state_dict: Mapping[str, torch.Tensor], ranks: dict[str, int], kind: str) -> None:
    for key, rank in ranks.items():
        if key not in state_dict:
            raise ValueError(f"the checkpoint has no {key!r}; expected a LAVIS BLIP-2 {kind} checkpoint")
        if state_dict[key].dim() != rank:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}; expected {rank} dimensions")


def lavis_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    vision=None,
    qformer_config=None,
    text_config: PreTrainedConfig | None = None,
    image_token_id: int | None = None,
) -> Blip2BridgeConfig:
    """The configuration of a LAVIS checkpoint.

    vision: a preset (`"eva_clip_g"`, `"clip_L"`), a JSON file or dict of a transformers vision config, or a config;
        default: the preset of the checkpoint's tower layout.
    qformer_config: BERT-style settings (dict, JSON file or config) over BERT-base's; default BERT-base.
    text_config, image_token_id: for a stage-2 checkpoint, the configuration of its pretrained LLM and the id of the
        image placeholder in the LLM's vocabulary.
    The checkpoint itself tells the number of queries and, for stage 1, the ITC width and the vocabulary size; the
    [DEC] token is the last vocabulary row unless `qformer_config` names a `bos_token_id`.
    """
    stage2_model = lavis_stage2_model_of(state_dict)
    check_language_model_given(stage2_model, text_config is not None)
    vision_config = vision_config_for(vision, vision_layout_of(state_dict))
    if stage2_model is None:
        word_embeddings_key = "Qformer.bert.embeddings.word_embeddings.weight"
        check_ranks(state_dict, {"query_tokens": 3, "vision_proj.weight": 2, word_embeddings_key: 2}, "stage-1")
        vocab_size = state_dict[word_embeddings_key].shape[0]
        qformer_kwargs = {"bos_token_id": vocab_size - 1, **qformer_config_kwargs(qformer_config)}
        return Blip2BridgeConfig(
            vision_config=vision_config,
            qformer_config=Blip2BridgeQFormerConfig(**qformer_kwargs, vocab_size=vocab_size),
            num_query_tokens=state_dict["query_tokens"].shape[1],
            embed_dim=state_dict["vision_proj.weight"].shape[0],
            vision_feature_layer=-1,
        )

    projection_key = stage2_model.projection_prefix + "weight"
    check_ranks(state_dict, {"query_tokens": 3, projection_key: 2}, "stage-2")
    if state_dict[projection_key].shape[0] != text_config.hidden_size:
        raise ValueError(
            f"{projection_key} has shape {tuple(state_dict[projection_key].shape)}: it projects to width "
            f"{state_dict[projection_key].shape[0]}, but the language model given ({text_config.model_type}) has "
            f"hidden_size {text_config.hidden_size}; expected the LLM the checkpoint was trained with"
        )
    qformer_kwargs = qformer_config_kwargs(qformer_config)
    instruction = reads_instruction(state_dict, stage2_model)
    if instruction:  # InstructBLIP: the Q-Former's vocabulary is LAVIS's BERT tokenizer with [DEC], as in stage 1
        check_ranks(state_dict, {QFORMER_WORD_EMBEDDINGS: 2}, "InstructBLIP")
        vocab_size = state_dict[QFORMER_WORD_EMBEDDINGS].shape[0]
        qformer_kwargs = {"bos_token_id": vocab_size - 1, **qformer_kwargs, "vocab_size": vocab_size}
    bridge_config = Blip2BridgeConfig(
        vision_config=vision_config,
        qformer_config=Blip2BridgeQFormerConfig(**qformer_kwargs),
        num_query_tokens=state_dict["query_tokens"].shape[1],
        vision_feature_layer=-1,
    )
    # stage2_config makes the Q-Former read queries only (use_text_input=False), as every stage-2 config; an
    # InstructBLIP Q-Former also reads the instruction (qformer_input_ids), with the text side it keeps.
    config = stage2_config(bridge_config, text_config, image_token_id)
    config.qformer_config.use_text_input = instruction
    return config


# ---- conversion -------------------------------------------------------------------------------------------------


def expected_shapes(config: Blip2BridgeConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes, from a model on the meta device (no memory, no initialisation cost).

    For a stage-2 configuration, the LLM's tensors are left out: they come from the LLM's own checkpoint.
    """
    with torch.device("meta"):
        model = Blip2BridgeModel(config) if config.text_config is None else Blip2BridgeForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return {name: shape for name, shape in shapes.items() if not name.startswith("language_model.")}


def lavis_weight_rules(
    config: Blip2BridgeConfig,
    our_names,
    state_dict: Mapping[str, torch.Tensor],
    layout: VisionLayout,
    stage2_model: LavisStage2Model | None,
) -> list[WeightRule]:
    qformer_config = config.qformer_config
    qformer_sources = parameter_sources(
        qformer_module_sources(
            qformer_config.num_hidden_layers, qformer_config.cross_attention_frequency, from_lavis_qformer=True
        ),
        our_names,
        target_prefix="qformer.",
        source_prefix="Qformer.bert.",
    )
    shared_rules = [
        *(with_prefixes(rule, "vision_model.", VISION_PREFIX) for rule in layout.rules(config.vision_config)),
        *copy_module_rules("vision_layernorm", "ln_vision"),
        copy_rule("query_tokens", "query_tokens"),
        *(copy_rule(target, source) for target, source in qformer_sources.items()),
    ]
    if stage2_model is not None:  # the table above holds the text side only where our Q-Former has one (InstructBLIP)
        return [*shared_rules, *copy_module_rules("language_projection", stage2_model.projection_prefix[:-1])]

    qformer_sources = parameter_sources(ITG_HEAD_MODULE_SOURCES, our_names, source_prefix=QFORMER_PREFIX)
    # LAVIS ties cls.predictions.decoder.bias to cls.predictions.bias and saves both; older saves may hold only one.
    decoder_bias = "Qformer.cls.predictions.bias"
    if decoder_bias not in state_dict and "Qformer.cls.predictions.decoder.bias" in state_dict:
        decoder_bias = "Qformer.cls.predictions.decoder.bias"
    return [
        *shared_rules,
        *(copy_rule(target, source) for target, source in qformer_sources.items()),
        # The ITG decoder weight is tied to the word embeddings, in LAVIS as in ours.
        copy_rule("itg_head.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
        copy_rule("itg_head.decoder.bias", decoder_bias),
        *copy_module_rules("vision_proj", "vision_proj"),
        *copy_module_rules("text_proj", "text_proj"),
        *copy_module_rules("itm_head", "itm_head"),
        WeightRule(("temp",), ("temp",), SCALAR_TO_VECTOR),
    ]


def reason_to_ignore(key: str, config: Blip2BridgeConfig, layout: VisionLayout) -> str | None:
    """Why a checkpoint tensor that no rule reads may be left out, or None when it should not be in the checkpoint."""
    if key == "Qformer.bert.embeddings.position_ids":
        return "a buffer of position indices"
    if config.text_config is not None and QFORMER_TEXT_SIDE.match(key):
        if config.qformer_config.use_text_input:  # InstructBLIP: only the ITG head goes unused
            return "the Q-Former's ITG head, which InstructBLIP does not use (LAVIS drops it)"
        return "the Q-Former's text side, which stage 2 does not use (LAVIS's stage-2 models drop it)"
    if key in TIED_COPIES:
        return f"a tied copy of {TIED_COPIES[key]}"
    if key.startswith(VISION_PREFIX):
        name = key[len(VISION_PREFIX) :]
        block = layout.block_pattern.match(name)
        if block and int(block.group(1)) >= config.vision_config.num_hidden_layers:
            return f"LAVIS builds the {layout.name} with {config.vision_config.num_hidden_layers} blocks"
        if name.startswith(layout.unbuilt_modules):
            return f"LAVIS's {layout.name} has no such module"
    return None


def check_tied_copies(state_dict: Mapping[str, torch.Tensor]) -> None:
    for copy, original in TIED_COPIES.items():
        if copy in state_dict and original in state_dict and not torch.equal(state_dict[copy], state_dict[original]):
            logger.warning(f"{copy} differs from {original}; LAVIS ties them, and the converted model uses {original}")


def refuse_too_shallow_tower(state_dict, vision_config: PreTrainedConfig, layout: VisionLayout) -> None:
    """The most common mismatch, said plainly: the vision config builds more blocks than the checkpoint holds."""
    names = [key[len(VISION_PREFIX) :] for key in state_dict if key.startswith(VISION_PREFIX)]
    num_blocks = 1 + max(int(block.group(1)) for block in map(layout.block_pattern.match, names) if block)
    if num_blocks < vision_config.num_hidden_layers:
        raise ValueError(
            f"the checkpoint's {layout.name} has {num_blocks} blocks; the vision config builds "
            f"{vision_config.num_hidden_layers}. Give a vision config with num_hidden_layers={num_blocks} or less"
        )


def convert_lavis_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Blip2BridgeConfig
) -> dict[str, torch.Tensor]:
    """A LAVIS state dict (with `visual_encoder.*`) as the state dict of our model of `config`.

    Stage 1: a `Blip2BridgeModel(config)` state dict. Stage 2 (`config.text_config` set): the state dict of a
    `Blip2BridgeForConditionalGeneration(config)` without its `language_model.*`, which the LLM's own checkpoint
    provides; the checkpoint must hold no LLM tensors (see `split_language_model_weights`).
    Every tensor of ours is filled; every checkpoint tensor is used or deliberately ignored (position-id buffer, tied
    copies, vision blocks and heads that LAVIS's tower does not build, the Q-Former's text side in stage 2). Anything
    else, a missing tensor, or a shape that does not fit `config` raises a ValueError naming the checkpoint key.
    """
    stage2_model = lavis_stage2_model_of(state_dict)
    if (stage2_model is None) != (config.text_config is None):
        checkpoint_stage, config_stage = ("stage-1", "stage-2") if stage2_model is None else ("stage-2", "stage-1")
        raise ValueError(f"a {checkpoint_stage} checkpoint cannot fill a {config_stage} configuration")
    layout = vision_layout_of(state_dict)
    shapes = expected_shapes(config)
    rules = lavis_weight_rules(config, shapes, state_dict, layout, stage2_model)

    refuse_too_shallow_tower(state_dict, config.vision_config, layout)
    missing = [source for rule in rules for source in rule.sources if source not in state_dict]
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensors the configuration needs, e.g. {missing[:3]}; check the "
            "vision preset/config (depth) and the Q-Former config (layers, cross_attention_frequency)"
        )

    converted, used = {}, set()
    for rule in rules:
        tensors = [state_dict[source] for source in rule.sources]
        target_shapes = [shapes[target] for target in rule.targets]
        for source, tensor, shape in zip(rule.sources, tensors, rule.transform.source_shapes(target_shapes)):
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{source} has shape {tuple(tensor.shape)} in the checkpoint; the configuration expects "
                    f"{tuple(shape)} (for {', '.join(rule.targets)})"
                )
        converted.update(zip(rule.targets, rule.transform.apply(tensors, target_shapes)))
        used.update(rule.sources)

    # Deliberately without counterpart: LAVIS's towers have no final LayerNorm and our features are read before it.
    for name in ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"):
        if name in shapes:
            converted[name] = (torch.ones if name.endswith("weight") else torch.zeros)(shapes[name])

    unused = sorted(set(state_dict) - used)
    unexpected = [key for key in unused if reason_to_ignore(key, config, layout) is None]
    if unexpected:
        raise ValueError(
            f"the checkpoint holds {len(unexpected)} tensors with no place in the model, e.g. {unexpected[:3]}; check "
            "the vision preset/config (depth) and the Q-Former config (layers, cross_attention_frequency)"
        )
    ignored_by_reason: dict[str, list[str]] = {}
    for key in unused:
        ignored_by_reason.setdefault(reason_to_ignore(key, config, layout), []).append(key)
    for reason, keys in ignored_by_reason.items():
        logger.info(f"ignoring {len(keys)} checkpoint tensors ({keys[0]}, ...): {reason}")
    check_tied_copies(state_dict)

    unfilled = sorted(set(shapes) - set(converted))
    if unfilled:  # a gap in the tables above, not in the checkpoint
        raise RuntimeError(f"the LAVIS conversion leaves {unfilled[:3]} unfilled")
    return {name: converted[name].contiguous() for name in shapes}


def convert_lavis_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    vision=None,
    qformer_config=None,
    vision_checkpoint: str | os.PathLike | None = None,
    language_model: str | os.PathLike | PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Blip2BridgeModel | Blip2BridgeForConditionalGeneration:
    """Converts a LAVIS `.pth` checkpoint and saves it to `output_dir` (safetensors); returns the model.

    The arguments are those of `load_lavis_checkpoint`; a stage-2 model's tokenizer is saved beside it.
    """
    model, tokenizer = load_lavis_checkpoint(
        checkpoint_path, vision, qformer_config, vision_checkpoint, language_model, tokenizer
    )
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return model


def load_lavis_checkpoint(
    checkpoint_path: str | os.PathLike,
    vision=None,
    qformer_config=None,
    vision_checkpoint: str | os.PathLike | None = None,
    language_model: str | os.PathLike | PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[Blip2BridgeModel | Blip2BridgeForConditionalGeneration, PreTrainedTokenizerBase | None]:
    """Our model of a LAVIS `.pth` checkpoint, and the LLM's tokenizer (with "<image>") for a stage-2 one.

    vision: `"eva_clip_g"`, `"clip_L"` or a JSON file of a transformers vision config; default: the checkpoint's
        tower layout's preset. qformer_config: a BERT-style JSON file or dict; default BERT-base.
    vision_checkpoint: the vision tower's own weights (LAVIS's `eva_vit_g.pth` / `clip_vit_L.pth`), for checkpoints
        saved without their frozen image encoder.
    language_model: for a stage-2 checkpoint (`blip2_opt`, `blip2_t5`, `blip2_vicuna_instruct`, `blip2_t5_instruct`),
        the pretrained LLM it was trained with (a path or hub id, or a model). tokenizer: its tokenizer; default: the
        one saved with `language_model` when it is a path. The tokenizer gets "<image>" for `config.image_token_id`
        (and, for `blip2_vicuna_instruct`, LAVIS's special tokens: see `give_lavis_special_tokens`).
    An InstructBLIP checkpoint gives a model whose Q-Former reads the instruction (`qformer_input_ids`,
    `qformer_attention_mask`: LAVIS's BERT tokenizer with "[DEC]", bert-base-uncased's for the released checkpoints).
    """
    vision_weights = None if vision_checkpoint is None else load_lavis_state_dict(vision_checkpoint)
    state_dict = with_vision_weights(load_lavis_state_dict(checkpoint_path), vision_weights)
    stage2_model = lavis_stage2_model_of(state_dict)
    check_language_model_given(stage2_model, language_model is not None)
    if stage2_model is None:
        config = lavis_config_from_state_dict(state_dict, vision=vision, qformer_config=qformer_config)
        # Convert (checking depth, names and shapes against a meta-device model) before building the real one: a
        # mismatched preset (ViT-g + BERT-base, ~4 GB to allocate and initialise) is refused in milliseconds.
        converted = convert_lavis_state_dict(state_dict, config)
        model = Blip2BridgeModel(config)
        model.load_state_dict(converted, strict=True)
        return model, None

    state_dict, language_model_weights = split_language_model_weights(state_dict, stage2_model)
    language_model, tokenizer = lavis_language_model(language_model, tokenizer, stage2_model)
    give_lavis_special_tokens(language_model, tokenizer, stage2_model)
    if language_model_weights:
        load_language_model_weights(language_model, language_model_weights, stage2_model)
    image_token_id = add_image_token_to_language_model(language_model, tokenizer, None)
    config = lavis_config_from_state_dict(
        state_dict, vision=vision, qformer_config=qformer_config, text_config=language_model.config,
        image_token_id=image_token_id,
    )  # fmt: skip
    model = assemble_stage2_model(config, convert_lavis_state_dict(state_dict, config), language_model)
    stop_where_lavis_stops(model, tokenizer)
    return model, tokenizer


def give_lavis_special_tokens(
    language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, stage2_model: LavisStage2Model
) -> None:
    """The LLM tokenizer's special tokens as LAVIS sets them (blip2_vicuna_instruct: pad "[PAD]", bos/eos/unk "</s>"),
    and the LLM's embeddings grown to hold the tokenizer, as LAVIS resizes them (Vicuna: 32000 -> 32001 rows).

    A tokenizer that starts every text with its bos token keeps doing so with the new one, as LAVIS's (slow)
    LlamaTokenizer does: LAVIS's prompts start with "</s>". The "[PAD]" row only ever meets padding, which LAVIS masks.
    """
    special_tokens = dict(stage2_model.tokenizer_special_tokens)
    if not special_tokens:
        return
    if tokenizer is None:
        logger.warning(
            f"{stage2_model.name} gives its LLM tokenizer the special tokens {special_tokens}; without a tokenizer, "
            "give them to yours as LAVIS does"
        )
        return
    old_bos_id = tokenizer.bos_token_id
    starts_with_bos = old_bos_id is not None and tokenizer("a").input_ids[:1] == [old_bos_id]
    tokenizer.add_special_tokens(special_tokens)
    if starts_with_bos and tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
        # A fast tokenizer adds its bos token through its post-processor, which holds the old one until rebuilt.
        if hasattr(tokenizer, "update_post_processor"):
            tokenizer.add_bos_token = True
            tokenizer.update_post_processor()
        if tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
            logger.warning(
                f"the tokenizer does not start texts with its new bos token {tokenizer.bos_token!r}, as LAVIS's does; "
                f"prepend id {tokenizer.bos_token_id} to prompts to reproduce {stage2_model.name}"
            )
    tokenizer.truncation_side = "left"  # LAVIS truncates prompts on the left
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer))
    logger.info(f"LLM tokenizer given {special_tokens}, as {stage2_model.name} does; {len(tokenizer)} tokens")


def stop_where_lavis_stops(model, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """OPT generation ends at "\n" in LAVIS (`Blip2OPT.generate`): the converted model's LLM stops there too, as
    transformers' own conversion of these checkpoints does (its OPT `text_config.eos_token_id` is the "\n" id)."""
    end_of_text = default_end_of_text(model.config.text_config)
    if end_of_text is None or tokenizer is None:
        return
    (stop_id,) = end_of_text_ids(tokenizer, end_of_text)
    model.config.text_config.eos_token_id = stop_id
    model.language_model.generation_config.eos_token_id = stop_id


def lavis_language_model(
    language_model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    stage2_model: LavisStage2Model,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The pretrained LLM configured as LAVIS runs it, and its tokenizer."""
    overrides = dict(stage2_model.language_model_config)
    if isinstance(language_model, PreTrainedModel):
        differing = {k: getattr(language_model.config, k, None) for k, v in overrides.items()}
        differing = {k: v for k, v in differing.items() if v != overrides[k]}
        if differing:
            logger.warning(
                f"{stage2_model.name} runs its LLM with {overrides}; the language model given has {differing}. Pass "
                "its path instead to have it loaded with LAVIS's settings"
            )
        return language_model, tokenizer
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(language_model)
        except (OSError, ValueError):
            logger.warning(f"no tokenizer found with {language_model}; the image placeholder becomes a new LLM row")
    if overrides:
        logger.info(f"loading {language_model} with {overrides}, as {stage2_model.name} does")
    return load_language_model(language_model, **overrides), tokenizer


def load_language_model_weights(
    language_model: PreTrainedModel, weights: dict[str, torch.Tensor], stage2_model: LavisStage2Model
) -> None:
    """LLM tensors saved in the checkpoint (LAVIS's OPT and T5 copies keep transformers' names) replace the LLM's."""
    ours = language_model.state_dict()
    prefix = stage2_model.language_model_prefix
    unknown = sorted(name for name in weights if name not in ours)
    if unknown:
        raise ValueError(
            f"the checkpoint's {prefix}* tensors do not fit the language model given, e.g. {prefix}{unknown[0]}"
        )
    for name, tensor in weights.items():
        if tensor.shape != ours[name].shape:
            raise ValueError(
                f"{prefix}{name} has shape {tuple(tensor.shape)}; the language model given has {tuple(ours[name].shape)}"
            )
    language_model.load_state_dict(weights, strict=False)
    logger.info(f"{len(weights)} LLM tensors of the checkpoint replace the pretrained ones")


__all__ = [
    "VISION_PRESETS",
    "convert_lavis_checkpoint",
    "convert_lavis_state_dict",
    "lavis_config_from_state_dict",
    "load_lavis_checkpoint",
    "split_language_model_weights",
    "load_lavis_state_dict",
]
