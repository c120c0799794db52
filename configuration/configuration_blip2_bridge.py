"""Configurations of blip2-bridge: one for the Q-Former, one composite for the whole model."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class Blip2BridgeQFormerConfig(PreTrainedConfig):
    r"""
    Configuration of the Querying Transformer: a BERT encoder whose layers also hold cross-attention to the image
    features (every `cross_attention_frequency` layers) and a second feed-forward block used by the query positions.

    Args:
        vocab_size: size of the BERT vocabulary including the [DEC] token that starts ITG captions.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob,
        attention_probs_dropout_prob, max_position_embeddings, initializer_range, layer_norm_eps: as in BERT.
        cross_attention_frequency: layer `i` cross-attends to the image when `i % cross_attention_frequency == 0`.
        encoder_hidden_size: width of the image features the queries cross-attend to (set from the vision config).
        bos_token_id: id of the [DEC] token that replaces [CLS] for image-grounded text generation.
        use_text_input: False drops the word/position embeddings and the text feed-forward blocks, which a stage-2
            model never uses.
    """

    model_type = "blip2_bridge_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 30522
    sep_token_id: int | None = 102
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_text_input: bool = True

    def validate_architecture(self):
        """Part of the `@strict` validation transformers runs on every config."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency={self.cross_attention_frequency}; expected an integer >= 1")


class Blip2BridgeConfig(PreTrainedConfig):
    r"""
    Configuration of a BLIP-2 model: a frozen vision encoder, the Q-Former with its learned queries and, for stage 2,
    a frozen language model.

    Args:
        vision_config: any vision configuration `AutoModel` can build (Blip2Vision, CLIPVision, SiglipVision, ViT,
            Dinov2, ...), as a config or a dict with `model_type`.
        qformer_config: a [`Blip2BridgeQFormerConfig`] or its dict; `encoder_hidden_size` follows the vision width.
        text_config: a causal or seq2seq language model configuration for stage 2; None for a stage-1 model.
        num_query_tokens: number of learned queries (32 in the paper).
        embed_dim: width of the ITC projections (256 in the paper).
        vision_feature_layer: which vision hidden state the Q-Former reads, indexed into `hidden_states` (-1 is the
            output of the last layer before any final norm; -2 the penultimate layer, as the paper's EVA ViT-g).
            None takes the vision model's `last_hidden_state` as it is.
        vision_layer_norm_eps: eps of the LayerNorm (`ln_vision`) applied to the vision features.
        initial_temperature: initial value of the learnable ITC temperature `temp`.
        freeze_vision_model: keep the vision encoder frozen (no gradient, eval mode), as the paper does.
        freeze_language_model: keep the stage-2 language model frozen (no gradient), as the paper does; only the
            queries, the Q-Former and the language projection train. The model leaves its dropout to train/eval mode,
            as the original does; `Blip2BridgeTrainer` keeps frozen modules in eval mode (`frozen_modules_eval`).
        gather_with_grad: ITC's cross-process gather keeps the gradient of the other ranks' features. The original
            detaches them (default False), so that each direction of the loss trains one side only.
        image_token_id: id of the image placeholder token in the LLM's input ids (stage 2).
        tie_word_embeddings: the ITG head's vocabulary projection shares the Q-Former's word embeddings, as BERT's.
    """

    model_type = "blip2_bridge"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_vision_model"),
        "qformer_config": SubConfigSpec(config_class=Blip2BridgeQFormerConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256
    vision_feature_layer: int | None = -1
    vision_layer_norm_eps: float = 1e-5
    initial_temperature: float = 0.07
    freeze_vision_model: bool = True
    freeze_language_model: bool = True
    gather_with_grad: bool = False
    image_token_id: int | None = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.is_encoder_decoder = bool(self.text_config is not None and self.text_config.is_encoder_decoder)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """Stage 2: the language model's config. Stage 1 has no language model: the Q-Former reads and writes its text
        (its word embeddings are the input embeddings and, tied, the ITG head's output embeddings), so its config is
        where `resize_token_embeddings` and generation find the vocabulary."""
        if self.text_config is None:
            return self.qformer_config
        return super().get_text_config(decoder=decoder, encoder=encoder)

    def validate_architecture(self):
        """Part of the `@strict` validation transformers runs on every config."""
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens={self.num_query_tokens}; expected at least 1")


__all__ = ["Blip2BridgeConfig", "Blip2BridgeQFormerConfig"]
