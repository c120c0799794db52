"""The tiny random models of the tests, one builder each: stage 1 (`tiny_config`, `tiny_model`), stage 2
(`tiny_stage2_config`, `tiny_stage2` with its processor), a bare tiny LLM (`tiny_llm`) and their inputs."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeModel

VOCAB_SIZE = 100
DEC_ID = VOCAB_SIZE - 1
CLS_ID, SEP_ID, PAD_ID = 2, 3, 0


VISION_CONFIG = dict(
    model_type="blip_2_vision_model",
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    # Larger than the usual 0.02 so that different images give clearly different features.
    initializer_range=0.2,
)


def tiny_config(**overrides) -> Blip2BridgeConfig:
    kwargs = dict(
        vision_config=VISION_CONFIG,
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB_SIZE,
            bos_token_id=DEC_ID,
            sep_token_id=SEP_ID,
            pad_token_id=PAD_ID,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=16,
            # Larger than BERT's 0.02 so that a random model's similarities are spread out and every test sees
            # distinct values (0.02 leaves every image-text similarity nearly equal).
            initializer_range=0.2,
        ),
        num_query_tokens=4,
        embed_dim=16,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return Blip2BridgeConfig(**kwargs)


def tiny_model(seed: int = 0, attn_implementation: str = "eager", **overrides) -> Blip2BridgeModel:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    return Blip2BridgeModel(config)


def tiny_batch(batch_size: int = 4, text_length: int = 8, seed: int = 0, image_size: int = 28):
    """Images and [CLS]-first captions with varied lengths (the second caption is padded)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(5, DEC_ID, (batch_size, text_length), generator=generator)
    input_ids[:, 0] = CLS_ID
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:
        attention_mask[1, text_length // 2 :] = 0
        input_ids[1, text_length // 2 :] = PAD_ID
        input_ids[1, text_length // 2 - 1] = SEP_ID
    return pixel_values, input_ids, attention_mask


# ---- stage 2: a tiny LLM (OPT-like or T5-like) behind the Q-Former ------------------------------------------

STAGE2_VOCAB_SIZE = 99
IMAGE_TOKEN_ID = STAGE2_VOCAB_SIZE - 1
NUM_QUERY_TOKENS = 4
QFORMER_CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
TEXT_CONFIGS = {
    "opt": dict(
        model_type="opt",
        vocab_size=STAGE2_VOCAB_SIZE,
        hidden_size=16,
        word_embed_proj_dim=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        dropout=0.0,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=STAGE2_VOCAB_SIZE,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        dropout_rate=0.0,
    ),
}


def tiny_stage2_config(
    text: str = "opt",
    use_text_input: bool = False,
    text_overrides: dict | None = None,
    image_token_id: int = IMAGE_TOKEN_ID,
    qformer_config: dict | None = None,
    **overrides,
) -> Blip2BridgeConfig:
    """The one tiny stage-2 configuration: `VISION_CONFIG`, a `QFORMER_CONFIG` Q-Former and the LLM `TEXT_CONFIGS[text]`.

    text_overrides: changes to the LLM's options (its vocab_size to a tokenizer's, say). qformer_config: a whole
    Q-Former configuration instead of the default (tests whose pinned values were measured on another Q-Former keep
    it this way, unused options left out rather than set). overrides: the top-level options.
    """
    if qformer_config is None:
        qformer_config = dict(QFORMER_CONFIG, vocab_size=50, max_position_embeddings=16, use_text_input=use_text_input)
    return Blip2BridgeConfig(
        vision_config=VISION_CONFIG,
        qformer_config=qformer_config,
        text_config=dict(TEXT_CONFIGS[text], **(text_overrides or {})),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_id=image_token_id,
        **overrides,
    )


def prompts(batch_size: int = 2, text_length: int = 5, seed: int = 0, left_pad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, 28, 28, generator=generator)
    text = torch.randint(3, IMAGE_TOKEN_ID, (batch_size, text_length), generator=generator)
    input_ids = torch.cat([torch.full((batch_size, NUM_QUERY_TOKENS), IMAGE_TOKEN_ID), text], dim=1)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:  # the last prompt is two tokens shorter, padded on the left as for batched generation
        input_ids[-1] = torch.cat([torch.tensor([1, 1]), input_ids[-1, :-2]])
        attention_mask[-1, :2] = 0
    return pixel_values, input_ids, attention_mask


def decoder_inputs(name: str, batch_size: int = 2):
    if name != "t5":
        return {}
    return {"labels": torch.randint(3, IMAGE_TOKEN_ID, (batch_size, 4), generator=torch.Generator().manual_seed(1))}


# Room for the tiny tokenizers of tests/helpers.py (300 OPT tokens, 252 T5 tokens) and their "<image>".
LLM_VOCAB_SIZE = 320


def tiny_llm(name: str = "opt", vocab_size: int = LLM_VOCAB_SIZE, seed: int = 1, **config_overrides):
    """A bare tiny LLM of `TEXT_CONFIGS[name]` (the model a stage-2 model is built from or converted with)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**dict(TEXT_CONFIGS[name], vocab_size=vocab_size, **config_overrides))
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return model_class.from_config(config).eval()


def tiny_stage2(kind: str = "opt", seed: int = 0):
    """
    A tiny random stage-2 model on an OPT-like ("opt") or T5-like ("t5") LLM and its processor, whose tokenizer is
    trained on the fly: the LLM's vocabulary is the tokenizer's (with `<image>`), `config.image_token_id` its id.
    Weights get extra noise so that different images give different generations.
    """
    from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeImageProcessor, Blip2BridgeProcessor
    from tests.helpers import make_llm_tokenizer

    tokenizer = make_llm_tokenizer(kind, padding_side="left" if kind == "opt" else "right")
    image_processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    processor = Blip2BridgeProcessor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = tiny_stage2_config(
        kind, text_overrides=dict(vocab_size=len(tokenizer)), image_token_id=processor.image_token_id
    )
    torch.manual_seed(seed)
    model = Blip2BridgeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model, processor


# ---- a tiny BERT, as the stage-1 builder's Q-Former source --------------------------------------------------------

TINY_BERT_INITIALIZER_RANGE = 0.05


def tiny_bert(vocab_size: int, with_lm_head: bool = True, seed: int = 0, max_position_embeddings: int = 24):
    """A tiny random BERT (with its masked-LM head, or bare with a pooler): what the stage-1 builder initialises the
    Q-Former from."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        initializer_range=TINY_BERT_INITIALIZER_RANGE,
    )
    model = BertForMaskedLM(config) if with_lm_head else BertModel(config, add_pooling_layer=True)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that a copy cannot pass by chance
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()
