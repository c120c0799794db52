"""Tiny random stage-1 models shared by the tests."""

import torch

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


def tiny_stage2(kind: str = "opt", seed: int = 0):
    """
    A tiny random stage-2 model on an OPT-like ("opt") or T5-like ("t5") LLM and its processor, whose tokenizer is
    trained on the fly: the LLM's vocabulary is the tokenizer's (with `<image>`), `config.image_token_id` its id.
    Weights get extra noise so that different images give different generations.
    """
    from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeImageProcessor, Blip2BridgeProcessor
    from tests.helpers import make_llm_tokenizer
    from tests.test_stage2 import NUM_QUERY_TOKENS, QFORMER_CONFIG, TEXT_CONFIGS

    tokenizer = make_llm_tokenizer(kind, padding_side="left" if kind == "opt" else "right")
    image_processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    processor = Blip2BridgeProcessor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = Blip2BridgeConfig(
        vision_config=VISION_CONFIG,
        qformer_config=dict(QFORMER_CONFIG, vocab_size=50, max_position_embeddings=16, use_text_input=False),
        text_config=dict(TEXT_CONFIGS[kind], vocab_size=len(tokenizer)),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2BridgeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model, processor
