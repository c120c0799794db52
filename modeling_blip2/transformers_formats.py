"""transformers' own formats of the BLIP-2 family, in ours: their weight names (key mappings applied at load time by
`from_pretrained(key_mapping=...)`) and their configurations. Both stages load them (`converted_config`), the
exporter writes them back (export_transformers.py).

- "blip-2" saved by `Blip2ForConditionalGeneration` (stage 2) or `Blip2ForImageTextRetrieval` (stage 1);
- "instructblip" / "instructblipvideo" (stage 2 with an instruction-aware Q-Former).
"""

from transformers import Blip2Config, Blip2VisionConfig, InstructBlipConfig, InstructBlipVideoConfig

from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .weight_mapping import BERT_HYPERPARAMETERS

# transformers' BLIP-2 weight names -> ours, applied in order by `from_pretrained(key_mapping=...)`. Its vision
# tower's `post_layernorm` is the original's `ln_vision`: ours is `vision_layernorm`, applied to hidden_states[-1].
# One capturing group (the layer index) per pattern: what transformers' renaming supports.
QFORMER_LAYER = r"^qformer\.encoder\.layer\.(\d+)\."
BLIP2_KEY_MAPPING = {
    r"^vision_model\.post_layernorm\.": "vision_layernorm.",
    QFORMER_LAYER + r"attention\.attention\.": r"qformer.layer.\1.attention.",
    QFORMER_LAYER + r"attention\.output\.": r"qformer.layer.\1.attention.",
    QFORMER_LAYER + r"crossattention\.attention\.": r"qformer.layer.\1.crossattention.",
    QFORMER_LAYER + r"crossattention\.output\.": r"qformer.layer.\1.crossattention.",
    QFORMER_LAYER + r"intermediate_query\.dense\.": r"qformer.layer.\1.query_feed_forward.intermediate.",
    QFORMER_LAYER + r"output_query\.dense\.": r"qformer.layer.\1.query_feed_forward.output.",
    QFORMER_LAYER + r"output_query\.LayerNorm\.": r"qformer.layer.\1.query_feed_forward.LayerNorm.",
}
# transformers' InstructBLIP (and InstructBLIP-Video) weight names -> ours: BLIP-2's, plus the Q-Former's text side,
# which reads the instruction: its embeddings (word and position embeddings, and the LayerNorm that BLIP-2 keeps at
# `qformer.layernorm` and InstructBLIP at `qformer.embeddings.layernorm`) and each layer's text feed-forward
# (`intermediate` / `output`, beside the queries' `intermediate_query` / `output_query`).
INSTRUCTBLIP_KEY_MAPPING = {
    **BLIP2_KEY_MAPPING,
    r"^qformer\.embeddings\.": "qformer.",
    QFORMER_LAYER + r"intermediate\.dense\.": r"qformer.layer.\1.text_feed_forward.intermediate.",
    QFORMER_LAYER + r"output\.dense\.": r"qformer.layer.\1.text_feed_forward.output.",
    QFORMER_LAYER + r"output\.LayerNorm\.": r"qformer.layer.\1.text_feed_forward.LayerNorm.",
}
# transformers' instruction-aware families: model_type -> (config class, the name of its placeholder token's id).
INSTRUCTBLIP_FAMILIES = {
    InstructBlipConfig.model_type: (InstructBlipConfig, "image_token_index"),
    InstructBlipVideoConfig.model_type: (InstructBlipVideoConfig, "video_token_index"),
}

# BERT-style Q-Former sizes shared by transformers' Blip2QFormerConfig and ours.
QFORMER_FIELDS = ("vocab_size", *BERT_HYPERPARAMETERS, "cross_attention_frequency")


def config_from_blip2(blip2_config: Blip2Config) -> Blip2BridgeConfig:
    """Our configuration of a transformers `Blip2Config` (model_type "blip-2"), for `BLIP2_KEY_MAPPING`'s weights."""
    return _config_from_transformers(blip2_config, blip2_config.image_token_index, use_text_input=False)


def config_from_instructblip(config: InstructBlipConfig | InstructBlipVideoConfig) -> Blip2BridgeConfig:
    """Our configuration of transformers' `InstructBlipConfig` (model_type "instructblip") or `InstructBlipVideoConfig`
    ("instructblipvideo"), for `INSTRUCTBLIP_KEY_MAPPING`'s weights: a Q-Former that reads the instruction
    (`use_text_input=True`, with InstructBLIP's vocabulary and position table), the placeholder id of the image
    (`image_token_index`) or of the video (`video_token_index`). The two families hold the same weights; a video's
    frames each take `num_query_tokens` placeholders."""
    _, token_name = INSTRUCTBLIP_FAMILIES[config.model_type]
    return _config_from_transformers(config, getattr(config, token_name), use_text_input=True)


def _config_from_transformers(config, image_token_id: int | None, use_text_input: bool) -> Blip2BridgeConfig:
    qformer = config.qformer_config
    qformer_fields = {name: getattr(qformer, name) for name in QFORMER_FIELDS}
    if use_text_input:
        qformer_fields["pad_token_id"] = qformer.pad_token_id
    # InstructBLIP's vision tower is BLIP-2's (same layers, same names) under another model_type.
    vision_config = {**config.vision_config.to_dict(), "model_type": Blip2VisionConfig.model_type}
    return Blip2BridgeConfig(
        vision_config=vision_config,
        qformer_config={**qformer_fields, "use_text_input": use_text_input},
        text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_id=image_token_id,
        # The Q-Former reads the last layer's output through the LayerNorm transformers calls `post_layernorm`.
        vision_feature_layer=-1,
        vision_layer_norm_eps=config.vision_config.layer_norm_eps,
        initializer_range=config.initializer_range,
        dtype=config.dtype,  # dtype="auto" loads e.g. Salesforce/blip2-opt-2.7b in its saved float16
    )


# transformers' stage-1 BLIP-2 format (`Blip2ForImageTextRetrieval`, e.g. Salesforce/blip2-itm-vit-g) holds, beside
# what `BLIP2_KEY_MAPPING` renames (vision tower, its post_layernorm = our vision_layernorm, queries, Q-Former
# attention and query feed-forward), the Q-Former's text side and the ITC projections under these names. Both tables
# apply, in order (`BLIP2_RETRIEVAL_KEY_MAPPING`); `itm_head` and `qformer.layernorm` keep their names.
BLIP2_STAGE1_KEY_MAPPING = {
    r"^embeddings\.word_embeddings\.": "qformer.word_embeddings.",
    r"^embeddings\.position_embeddings\.": "qformer.position_embeddings.",
    QFORMER_LAYER + r"intermediate\.dense\.": r"qformer.layer.\1.text_feed_forward.intermediate.",
    QFORMER_LAYER + r"output\.dense\.": r"qformer.layer.\1.text_feed_forward.output.",
    QFORMER_LAYER + r"output\.LayerNorm\.": r"qformer.layer.\1.text_feed_forward.LayerNorm.",
    r"^vision_projection\.": "vision_proj.",
    r"^text_projection\.": "text_proj.",
}
BLIP2_RETRIEVAL_KEY_MAPPING = {**BLIP2_KEY_MAPPING, **BLIP2_STAGE1_KEY_MAPPING}
BLIP2_RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"
# What transformers' stage-1 format does not hold: initialised as the original (LAVIS `Blip2Qformer`) initialises them
# (`temp` = config.initial_temperature, 0.07; the ITG head = BERT's LM head, its decoder tied to the word embeddings).
NOT_IN_BLIP2_RETRIEVAL = (
    "temp",
    "itg_head.dense.weight",
    "itg_head.dense.bias",
    "itg_head.LayerNorm.weight",
    "itg_head.LayerNorm.bias",
    "itg_head.decoder.bias",
)


def config_from_blip2_retrieval(blip2_config: Blip2Config) -> Blip2BridgeConfig:
    """Our stage-1 configuration of a transformers `Blip2Config` saved by `Blip2ForImageTextRetrieval`, for
    `BLIP2_RETRIEVAL_KEY_MAPPING`'s weights. Its `text_config` (an LLM's, unused by that class) is left out.

    The [DEC] and [SEP] ids, which transformers' format does not record, are read from its Q-Former config when
    present, else ours: [DEC] = 30522 (LAVIS appends it to BERT's 30522 tokens) when the vocabulary holds it, else its
    last token; [SEP] = BERT's 102 when the vocabulary holds it. They matter for ITG and captioning only.
    """
    qformer = blip2_config.qformer_config
    vocab_size = qformer.vocab_size
    defaults = Blip2BridgeQFormerConfig()
    bos_token_id = getattr(qformer, "bos_token_id", None)
    if bos_token_id is None:
        bos_token_id = defaults.bos_token_id if defaults.bos_token_id < vocab_size else vocab_size - 1
    sep_token_id = getattr(qformer, "sep_token_id", None)
    if sep_token_id is None and defaults.sep_token_id < vocab_size:
        sep_token_id = defaults.sep_token_id
    return Blip2BridgeConfig(
        vision_config=blip2_config.vision_config.to_dict(),
        qformer_config={
            **{name: getattr(qformer, name) for name in QFORMER_FIELDS},
            "use_text_input": True,
            "bos_token_id": bos_token_id,
            "sep_token_id": sep_token_id,
        },
        text_config=None,
        num_query_tokens=blip2_config.num_query_tokens,
        embed_dim=blip2_config.image_text_hidden_size,
        # The Q-Former reads the last layer's output through the LayerNorm transformers calls `post_layernorm`.
        vision_feature_layer=-1,
        vision_layer_norm_eps=blip2_config.vision_config.layer_norm_eps,
        initializer_range=blip2_config.initializer_range,
        dtype=blip2_config.dtype,
    )


def is_blip2_retrieval_config(config_dict: dict) -> bool:
    """A transformers BLIP-2 config.json saved by `Blip2ForImageTextRetrieval` (or one whose Q-Former reads text)."""
    qformer = config_dict.get("qformer_config") or {}
    return BLIP2_RETRIEVAL_ARCHITECTURE in (config_dict.get("architectures") or []) or bool(
        qformer.get("use_qformer_text_input")
    )


def converted_config(config_dict: dict, stage: int, source="this folder") -> tuple[Blip2BridgeConfig, dict] | None:
    """(our config, key_mapping) of a config.json in one of transformers' BLIP-2 family formats, for a stage-`stage`
    model; None for any other (ours). A format of the other stage is refused, naming the class that loads it."""
    model_type = config_dict.get("model_type")
    if model_type == Blip2Config.model_type:
        if is_blip2_retrieval_config(config_dict) != (stage == 1):
            architectures = config_dict.get("architectures") or ["a BLIP-2 model"]
            wanted = (
                "Blip2BridgeModel (AutoModelForPreTraining)" if stage == 2
                else "Blip2BridgeForConditionalGeneration (AutoModelForImageTextToText)"
            )
            raise ValueError(
                f"{source} holds transformers' {architectures[0]}, a stage-{3 - stage} model: load it with "
                f"{wanted}; a stage-{stage} model loads "
                + (BLIP2_RETRIEVAL_ARCHITECTURE if stage == 1 else "Blip2ForConditionalGeneration or InstructBLIP")
            )
        blip2_config = Blip2Config.from_dict(config_dict)
        if stage == 1:
            return config_from_blip2_retrieval(blip2_config), BLIP2_RETRIEVAL_KEY_MAPPING
        return config_from_blip2(blip2_config), BLIP2_KEY_MAPPING
    if model_type in INSTRUCTBLIP_FAMILIES and stage == 2:
        config_class, _ = INSTRUCTBLIP_FAMILIES[model_type]
        return config_from_instructblip(config_class.from_dict(config_dict)), INSTRUCTBLIP_KEY_MAPPING
    return None
