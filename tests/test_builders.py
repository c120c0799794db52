"""The stage-1 builder: a Q-Former initialised from BERT as the paper does, next to a frozen pretrained vision model."""

import pytest
import torch
from transformers import (
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

from modeling_blip2 import Blip2BridgeModel
from modeling_blip2.builders import build_stage1_model
from tests.helpers import make_bert_tokenizer, tokenizer_without_dec
from tests.tiny_models import TINY_BERT_INITIALIZER_RANGE, tiny_bert


TINY_VISION = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
)


def tiny_clip_vision(seed: int = 1) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()


def qformer_layers(model):
    return model.qformer.layer


# ---- what the Q-Former takes from BERT ----------------------------------------------------------------------------


def test_qformer_starts_as_a_copy_of_bert_with_the_query_ffn_copied_from_bert_ffn():
    tokenizer = tokenizer_without_dec()
    bert = tiny_bert(len(tokenizer))
    model = build_stage1_model(tiny_clip_vision(), bert, tokenizer=tokenizer, num_query_tokens=4, embed_dim=16)
    qformer_config = model.config.qformer_config
    assert (qformer_config.hidden_size, qformer_config.num_hidden_layers) == (32, 4)
    assert qformer_config.intermediate_size == 64
    assert qformer_config.max_position_embeddings == 24
    assert qformer_config.initializer_range == TINY_BERT_INITIALIZER_RANGE

    embeddings = bert.bert.embeddings
    vocab_size = len(tokenizer) - 1  # the tokenizer now holds [DEC] too
    torch.testing.assert_close(model.qformer.word_embeddings.weight[:vocab_size], embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.qformer.position_embeddings.weight, embeddings.position_embeddings.weight)
    torch.testing.assert_close(model.qformer.layernorm.weight, embeddings.LayerNorm.weight)
    torch.testing.assert_close(model.qformer.layernorm.bias, embeddings.LayerNorm.bias)

    for ours, theirs in zip(qformer_layers(model), bert.bert.encoder.layer, strict=True):
        for projection in ("query", "key", "value"):
            torch.testing.assert_close(
                getattr(ours.attention, projection).weight, getattr(theirs.attention.self, projection).weight
            )
        torch.testing.assert_close(ours.attention.dense.bias, theirs.attention.output.dense.bias)
        torch.testing.assert_close(ours.attention.LayerNorm.weight, theirs.attention.output.LayerNorm.weight)
        for feed_forward in (ours.text_feed_forward, ours.query_feed_forward):
            torch.testing.assert_close(feed_forward.intermediate.weight, theirs.intermediate.dense.weight)
            torch.testing.assert_close(feed_forward.intermediate.bias, theirs.intermediate.dense.bias)
            torch.testing.assert_close(feed_forward.output.weight, theirs.output.dense.weight)
            torch.testing.assert_close(feed_forward.LayerNorm.bias, theirs.output.LayerNorm.bias)
        # Copies, not shared tensors: the two feed-forwards train apart.
        assert ours.text_feed_forward.output.weight.data_ptr() != ours.query_feed_forward.output.weight.data_ptr()

    transform = bert.cls.predictions.transform
    torch.testing.assert_close(model.itg_head.dense.weight, transform.dense.weight)
    torch.testing.assert_close(model.itg_head.LayerNorm.bias, transform.LayerNorm.bias)
    assert model.itg_head.decoder.weight is model.qformer.word_embeddings.weight
    torch.testing.assert_close(model.itg_head.decoder.bias[:vocab_size], bert.cls.predictions.bias)
    assert model.itg_head.decoder.bias[vocab_size].item() == 0.0


def test_cross_attention_exists_every_frequency_layers_and_new_weights_are_drawn_with_initializer_range():
    model = build_stage1_model(
        tiny_clip_vision(), tiny_bert(60), num_query_tokens=8, embed_dim=16, cross_attention_frequency=2
    )
    assert [layer.has_cross_attention for layer in qformer_layers(model)] == [True, False, True, False]
    assert [hasattr(layer, "crossattention") for layer in qformer_layers(model)] == [True, False, True, False]
    crossattention = qformer_layers(model)[0].crossattention
    assert crossattention.key.weight.shape == (32, 24)  # reads the vision width
    new_weights = torch.cat([crossattention.query.weight.flatten(), crossattention.key.weight.flatten()])
    assert abs(new_weights.std().item() - TINY_BERT_INITIALIZER_RANGE) < 0.1 * TINY_BERT_INITIALIZER_RANGE
    assert abs(new_weights.mean().item()) < 0.1 * TINY_BERT_INITIALIZER_RANGE
    assert torch.count_nonzero(crossattention.query.bias) == 0
    assert abs(model.query_tokens.std().item() - TINY_BERT_INITIALIZER_RANGE) < 0.15 * TINY_BERT_INITIALIZER_RANGE
    assert abs(model.query_tokens.mean().item()) < 0.1 * TINY_BERT_INITIALIZER_RANGE  # normal(0, std), centred
    assert model.query_tokens.shape == (1, 8, 32)

    frequency_three = build_stage1_model(tiny_clip_vision(), tiny_bert(60), cross_attention_frequency=3)
    assert [layer.has_cross_attention for layer in qformer_layers(frequency_three)] == [True, False, False, True]


# ---- [DEC] ----------------------------------------------------------------------------------------------------------


def test_tokenizer_without_bos_gets_dec_as_the_next_id_and_a_new_embedding_row():
    tokenizer = tokenizer_without_dec()
    vocab_size = len(tokenizer)
    assert tokenizer.bos_token is None
    model = build_stage1_model(tiny_clip_vision(), tiny_bert(vocab_size), tokenizer=tokenizer)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == vocab_size
    assert tokenizer.convert_tokens_to_ids("[DEC]") == vocab_size
    qformer_config = model.config.qformer_config
    assert (qformer_config.vocab_size, qformer_config.bos_token_id) == (vocab_size + 1, vocab_size)
    assert qformer_config.sep_token_id == tokenizer.sep_token_id == 3
    assert model.qformer.word_embeddings.weight.shape == (vocab_size + 1, 32)


def test_tokenizer_that_has_dec_already_keeps_its_id(tmp_path):
    tokenizer = make_bert_tokenizer(tmp_path)  # [DEC] is its last token
    model = build_stage1_model(tiny_clip_vision(), tiny_bert(len(tokenizer) - 1), tokenizer=tokenizer)
    assert model.config.qformer_config.bos_token_id == tokenizer.bos_token_id == len(tokenizer) - 1
    assert model.config.qformer_config.vocab_size == len(tokenizer)


def test_without_tokenizer_one_row_is_appended_for_dec_drawn_like_the_others():
    bert = tiny_bert(300, with_lm_head=False)
    model = build_stage1_model(tiny_clip_vision(), bert)
    assert model.config.qformer_config.bos_token_id == 300  # as bert-base's 30522
    assert model.config.qformer_config.vocab_size == 301
    dec_row = model.qformer.word_embeddings.weight[300]
    assert not torch.equal(dec_row, torch.zeros(32))
    assert dec_row.abs().max().item() < 6 * TINY_BERT_INITIALIZER_RANGE
    # No masked-LM head to copy: the ITG head keeps its fresh initialisation.
    assert torch.equal(model.itg_head.LayerNorm.weight, torch.ones(32))
    assert torch.count_nonzero(model.itg_head.decoder.bias) == 0


# ---- the vision model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_vision_model",
    [
        lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)),
        lambda: Blip2VisionModel(Blip2VisionConfig(**TINY_VISION)),
        lambda: ViTModel(ViTConfig(**TINY_VISION)),
        lambda: ViTModel(ViTConfig(**TINY_VISION), add_pooling_layer=False),
        lambda: Dinov2Model(Dinov2Config(**TINY_VISION)),
    ],
    ids=["clip", "blip2-eva", "vit", "vit-without-pooler", "dinov2"],
)
def test_vision_weights_are_copied_frozen_and_training_reaches_only_the_qformer(make_vision_model):
    torch.manual_seed(2)
    vision_model = make_vision_model().eval()
    model = build_stage1_model(vision_model, tiny_bert(60), num_query_tokens=4, embed_dim=16)
    ours = model.vision_model.state_dict()
    assert set(vision_model.state_dict()) <= set(ours)  # ours may hold a pooler the model was built without
    for name, tensor in vision_model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    assert not any(parameter.requires_grad for parameter in model.vision_model.parameters())
    model.train()
    assert not model.vision_model.training

    pixel_values = torch.randn(2, 3, 28, 28)
    input_ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=(input_ids != 0).long())
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.vision_model.parameters())


@pytest.mark.parametrize(
    "make_vision_model",
    [
        lambda: CLIPVisionModel(CLIPVisionConfig(**{**TINY_VISION, "num_hidden_layers": 3})),
        # Blip2VisionConfig's default initializer_range (1e-10) makes every block an identity.
        lambda: Blip2VisionModel(
            Blip2VisionConfig(**{**TINY_VISION, "num_hidden_layers": 3, "initializer_range": 0.2})
        ),
    ],
    ids=["clip", "blip2-eva"],
)
def test_the_qformer_reads_the_penultimate_vision_layer_by_default_as_the_original(make_vision_model):
    """The original's towers stop one block short (LAVIS eva_vit.py: 39 of EVA ViT-g's 40 blocks; clip_vit.py: 23 of
    CLIP ViT-L's 24) and ln_vision normalises that output: hidden_states[-2] of the whole tower."""
    torch.manual_seed(2)
    vision_model = make_vision_model().eval()
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden_states = vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert len(hidden_states) == 4  # the embeddings, then one per block

    model = build_stage1_model(vision_model, tiny_bert(60), num_query_tokens=4, embed_dim=16)
    with torch.no_grad():  # a non-trivial ln_vision, so that the comparison includes it
        model.vision_layernorm.weight.uniform_(0.5, 1.5)
        model.vision_layernorm.bias.normal_(0, 0.1)
        image_embeds = model(pixel_values=pixel_values).image_embeds
        penultimate = model.vision_layernorm(hidden_states[-2])
        last = model.vision_layernorm(hidden_states[-1])
    assert model.config.vision_feature_layer == -2
    torch.testing.assert_close(image_embeds, penultimate, rtol=1e-5, atol=1e-5)
    assert (penultimate - last).abs().max() > 0.1

    last_layer_model = build_stage1_model(vision_model, tiny_bert(60), num_query_tokens=4, vision_feature_layer=-1)
    last_layer_model.vision_layernorm.load_state_dict(model.vision_layernorm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(last_layer_model(pixel_values=pixel_values).image_embeds, last, rtol=1e-5, atol=1e-5)


def test_paths_are_loaded_from_a_composite_vision_checkpoint_and_a_bert_checkpoint(tmp_path):
    torch.manual_seed(3)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=TINY_VISION,
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=60
            ),
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    bert = tiny_bert(60)
    bert.save_pretrained(tmp_path / "bert")
    model = build_stage1_model(str(tmp_path / "clip"), str(tmp_path / "bert"))
    assert isinstance(model, Blip2BridgeModel)
    assert model.config.vision_config.model_type == "clip_vision_model"
    torch.testing.assert_close(
        model.vision_model.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )
    torch.testing.assert_close(model.itg_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(
        model.qformer.layer[3].query_feed_forward.output.weight, bert.bert.encoder.layer[3].output.dense.weight
    )


def test_a_text_model_that_is_not_bert_is_refused():
    with pytest.raises(TypeError, match="CLIPVisionModel; expected a BERT model"):
        build_stage1_model(tiny_clip_vision(), tiny_clip_vision())
