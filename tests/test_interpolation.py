"""Images of a higher resolution than the vision tower was built for (issue #15, item 2): with
`interpolate_pos_encoding=True` the tower's position table is interpolated by the tower itself (transformers' own
code), through stage-1 `forward` / `generate`, `get_image_embeds` / `get_image_features` and stage-2 `generate`."""

import pytest
import torch

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeForConditionalGeneration
from tests.tiny_models import (
    IMAGE_TOKEN_ID,
    NUM_QUERY_TOKENS,
    QFORMER_CONFIG,
    TEXT_CONFIGS,
    VISION_CONFIG,
    prompts,
    tiny_batch,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Towers built for 32-px images of 8-px patches (a 4x4 grid); the tests feed 48-px images (a 6x6 grid).
BUILT_FOR, FED = 32, 48
TOWERS = {
    "blip2": dict(VISION_CONFIG, image_size=BUILT_FOR, patch_size=8),
    "clip": dict(
        model_type="clip_vision_model",
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=BUILT_FOR,
        patch_size=8,
        initializer_range=0.2,
    ),
}
EXPECTED_TOWER_CLASS = {"blip2": "Blip2VisionModel", "clip": "CLIPVisionModel"}


def stage1(tower: str):
    return tiny_model(vision_config=TOWERS[tower], vision_feature_layer=-2).eval()


def position_and_patch_weights(model):
    embeddings = model.vision_model.embeddings
    table = embeddings.position_embedding
    return {"position": getattr(table, "weight", table), "patch": embeddings.patch_embedding.weight}


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_image_embeds_of_larger_images_are_the_towers_own_interpolation(tower):
    model = stage1(tower)
    assert type(model.vision_model).__name__ == EXPECTED_TOWER_CLASS[tower]
    pixel_values, _, _ = tiny_batch(batch_size=2, image_size=FED)
    with torch.no_grad():
        ours = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True)
        # The oracle: transformers' tower called directly, its hidden state at the feature layer, our LayerNorm.
        hidden_states = model.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True
        ).hidden_states
        oracle = model.vision_layernorm(hidden_states[-2])
        features = model.get_image_features(pixel_values, interpolate_pos_encoding=True)
    assert ours.shape == (2, 1 + (FED // 8) ** 2, 24)  # [CLS] + a 6x6 grid instead of 4x4
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-6)
    torch.testing.assert_close(features.last_hidden_state, oracle, rtol=0, atol=1e-6)
    assert features.pooler_output.shape == (2, model.config.num_query_tokens, model.config.embed_dim)
    assert torch.isfinite(features.pooler_output).all()
    with pytest.raises(ValueError, match=rf"pixel_values are {FED}x{FED} pixels .* expects {BUILT_FOR}x{BUILT_FOR} "):
        model.get_image_embeds(pixel_values)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_stage1_loss_on_larger_images_is_finite_and_reaches_an_unfrozen_tower(tower):
    model = stage1(tower)
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4, image_size=FED)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    with pytest.raises(ValueError, match=rf"pixel_values are {FED}x{FED} pixels"):
        model(**inputs)

    # Frozen (the default): the loss is the one of the interpolated image embeddings, and the tower gets no gradient.
    frozen = model(**inputs, interpolate_pos_encoding=True)
    with torch.no_grad():
        image_embeds = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True)
    from_embeds = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    assert torch.isfinite(frozen.loss) and frozen.loss.item() > 0
    torch.testing.assert_close(frozen.loss, from_embeds.loss, rtol=0, atol=1e-6)
    frozen.loss.backward()
    assert all(weight.grad is None for weight in position_and_patch_weights(model).values())
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    model.vision_model.requires_grad_(True)
    unfrozen = model(**inputs, interpolate_pos_encoding=True)
    torch.testing.assert_close(unfrozen.loss, frozen.loss, rtol=0, atol=1e-6)  # eval mode: same computation
    unfrozen.loss.backward()
    for name, weight in position_and_patch_weights(model).items():
        assert weight.grad is not None, name
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0, name
    # Every row of the 4x4 position table (and [CLS]'s) takes part in the interpolated 6x6 one.
    position_grad = position_and_patch_weights(model)["position"].grad.reshape(1 + (BUILT_FOR // 8) ** 2, -1)
    assert (position_grad.abs().sum(dim=-1) > 0).all()


def test_stage1_generate_reads_larger_images_with_the_flag():
    model = stage1("blip2")
    pixel_values, _, _ = tiny_batch(batch_size=2, image_size=FED)
    options = dict(num_beams=1, max_length=6, min_length=6)
    with torch.no_grad():
        image_embeds = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True)
    from_pixels = model.generate(pixel_values=pixel_values, interpolate_pos_encoding=True, **options)
    assert from_pixels.shape == (2, 6)
    assert torch.equal(from_pixels, model.generate(image_embeds=image_embeds, **options))
    with pytest.raises(ValueError, match=rf"pixel_values are {FED}x{FED} pixels"):
        model.generate(pixel_values=pixel_values, **options)


def stage2_on_a_32px_tower():
    config = Blip2BridgeConfig(
        vision_config=TOWERS["blip2"],
        qformer_config=dict(QFORMER_CONFIG, vocab_size=50, max_position_embeddings=16),
        text_config=TEXT_CONFIGS["opt"],
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_id=IMAGE_TOKEN_ID,
    )
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(config).eval()
    with torch.no_grad():  # noise, so that different images give different tokens
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def test_stage2_reads_larger_images_through_image_embeds_image_features_and_generate():
    model = stage2_on_a_32px_tower()
    _, input_ids, attention_mask = prompts()
    pixel_values = torch.randn(2, 3, FED, FED, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image_embeds = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True)
        features = model.get_image_features(pixel_values, interpolate_pos_encoding=True)
        from_embeds = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
        from_features = model(
            image_features=features.pooler_output, input_ids=input_ids, attention_mask=attention_mask
        )
    assert image_embeds.shape == (2, 1 + (FED // 8) ** 2, 24)
    torch.testing.assert_close(features.last_hidden_state, image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(from_features.logits, from_embeds.logits, rtol=0, atol=1e-6)
    assert torch.isfinite(from_embeds.logits).all()
    # forward takes the flag, as transformers' BLIP-2 forward does; 48-px pixels without it are refused naming both sizes.
    with torch.no_grad():
        from_pixels = model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, interpolate_pos_encoding=True
        )
    torch.testing.assert_close(from_pixels.logits, from_embeds.logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=rf"pixel_values are {FED}x{FED} pixels .* expects {BUILT_FOR}x{BUILT_FOR} "):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)

    # generate takes the flag, as transformers' BLIP-2 generate does: the same tokens as from the image embeddings.
    options = dict(do_sample=False, num_beams=1, max_new_tokens=4, min_new_tokens=4)
    generated = model.generate(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, interpolate_pos_encoding=True,
        **options,
    )
    assert generated.shape == (2, input_ids.shape[1] + 4)
    assert torch.equal(generated, model.generate(image_embeds=image_embeds, input_ids=input_ids,
                                                 attention_mask=attention_mask, **options))
    with pytest.raises(ValueError, match=rf"pixel_values are {FED}x{FED} pixels"):
        model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **options)
