"""transformers' stage-1 BLIP-2 format (`Blip2ForImageTextRetrieval`, e.g. Salesforce/blip2-itm-vit-g) in and out of
our stage-1 `Blip2BridgeModel`: identical ITM logits and ITC similarities both ways, and what the format cannot hold
(the ITC temperature, the ITG head) reported by a warning."""

import logging

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval, CLIPVisionConfig

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeForConditionalGeneration, Blip2BridgeModel
from modeling_blip2.export_transformers import export_stage1_to_transformers
from modeling_blip2.transformers_formats import NOT_IN_BLIP2_RETRIEVAL
from tests.helpers import make_bert_tokenizer
from tests.tiny_models import tiny_stage2_config
from tests.tiny_models import DEC_ID, SEP_ID, VISION_CONFIG, VOCAB_SIZE, tiny_batch, tiny_model

NUM_QUERY_TOKENS = 4
IMAGE_TOKEN_ID = 1
STAGE1_LOGGER = "modeling_blip2.modeling_stage1"
EXPORT_LOGGER = "modeling_blip2.export_transformers"


def tiny_blip2_config(image_token_index=None, **qformer_overrides) -> Blip2Config:
    return Blip2Config(
        vision_config={name: value for name, value in VISION_CONFIG.items() if name != "model_type"},
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": VOCAB_SIZE,
            "max_position_embeddings": 16,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "use_qformer_text_input": True,  # what Blip2ForImageTextRetrieval's text pass needs
            **qformer_overrides,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=16,
        image_token_index=image_token_index,
    )


def random_retrieval_model(image_token_index=None) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(tiny_blip2_config(image_token_index))
    with torch.no_grad():
        for parameter in model.parameters():  # query tokens start at zero, norms at one: make every weight count
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def random_stage1_model(**overrides) -> Blip2BridgeModel:
    # transformers' post_layernorm takes the vision layers' eps (1e-6 here): ours matches it for an exact export.
    model = tiny_model(vision_layer_norm_eps=1e-6, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def their_inputs(input_ids, attention_mask, image_token_index):
    """With `image_token_index` set, transformers' processor puts num_query_tokens image tokens before the text."""
    if image_token_index is None:
        return input_ids, attention_mask
    placeholders = torch.full((input_ids.shape[0], NUM_QUERY_TOKENS), image_token_index, dtype=input_ids.dtype)
    return torch.cat([placeholders, input_ids], 1), torch.cat([torch.ones_like(placeholders), attention_mask], 1)


def their_scores(theirs, pixel_values, input_ids, attention_mask, image_token_index=None):
    input_ids, attention_mask = their_inputs(input_ids, attention_mask, image_token_index)
    with torch.no_grad():
        itm = theirs(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
            use_image_text_matching_head=True,
        ).logits_per_image
        itc = theirs(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits_per_image
    return itm, itc


def our_scores(ours, pixel_values, input_ids, attention_mask):
    """ITM logits, and the ITC similarities without the temperature, computed two ways."""
    with torch.no_grad():
        itm = ours.get_itm_logits(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        output = ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
        image_feats = ours.get_image_features(pixel_values=pixel_values).pooler_output
        text_feats = ours.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    from_features = torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)
    return itm, output.logits_per_image * ours.temp, from_features


@pytest.mark.parametrize("image_token_index", [None, IMAGE_TOKEN_ID], ids=["plain-text", "image-tokens"])
def test_a_transformers_retrieval_folder_loads_with_identical_itm_and_itc_scores(image_token_index, tmp_path, caplog):
    theirs = random_retrieval_model(image_token_index)
    theirs.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=STAGE1_LOGGER):
        ours, info = Blip2BridgeModel.from_pretrained(tmp_path, output_loading_info=True)
    ours.eval()
    # Every weight of the folder is used; only what the format lacks is new.
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert info["missing_keys"] == set(NOT_IN_BLIP2_RETRIEVAL)

    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)  # the second caption is padded
    their_itm, their_itc = their_scores(theirs, pixel_values, input_ids, attention_mask, image_token_index)
    our_itm, our_itc, our_itc_from_features = our_scores(ours, pixel_values, input_ids, attention_mask)
    assert their_itm.shape == (3, 2) and their_itc.shape == (3, 3)
    assert (their_itm - our_itm).abs().max() <= 1e-4
    assert (their_itc - our_itc).abs().max() <= 1e-4
    assert (their_itc - our_itc_from_features).abs().max() <= 1e-4
    # The scores differ between pairs: the comparison is not one of constants.
    assert their_itm[:, 1].std() > 1e-2 and their_itc.std() > 1e-2


def test_the_loaded_config_and_what_the_format_lacks_initialised_as_the_original_with_a_warning(tmp_path, caplog):
    random_retrieval_model().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=STAGE1_LOGGER):
        ours = Blip2BridgeModel.from_pretrained(tmp_path)
    warnings = [record.getMessage() for record in caplog.records if record.name == STAGE1_LOGGER]
    assert len(warnings) == 1
    assert "Blip2ForImageTextRetrieval format, which holds no temp, itg_head.dense.weight" in warnings[0]
    assert all(name in warnings[0] for name in NOT_IN_BLIP2_RETRIEVAL)
    assert "temp = 0.07" in warnings[0]

    config = ours.config
    assert config.text_config is None and config.qformer_config.use_text_input
    assert config.num_query_tokens == NUM_QUERY_TOKENS and config.embed_dim == 16
    assert config.vision_feature_layer == -1 and config.vision_layer_norm_eps == 1e-6
    assert config.qformer_config.vocab_size == VOCAB_SIZE and config.qformer_config.max_position_embeddings == 16
    assert config.qformer_config.bos_token_id == VOCAB_SIZE - 1  # [DEC]: BERT's 30522 lies outside this vocabulary
    # As LAVIS's Blip2Qformer: temp 0.07, the ITG head BERT's LM head with its decoder tied to the word embeddings.
    assert float(ours.temp.detach()) == pytest.approx(0.07)
    assert ours.itg_head.decoder.weight.data_ptr() == ours.qformer.word_embeddings.weight.data_ptr()
    assert torch.equal(ours.itg_head.LayerNorm.weight, torch.ones(32))
    assert torch.equal(ours.itg_head.LayerNorm.bias, torch.zeros(32))
    assert torch.equal(ours.itg_head.dense.bias, torch.zeros(32))
    assert torch.equal(ours.itg_head.decoder.bias, torch.zeros(VOCAB_SIZE))
    assert float(ours.itg_head.dense.weight.detach().std()) == pytest.approx(config.initializer_range, rel=0.5)

    # Saved again, the folder is ours (our names, our config) and loads without a warning or a missing weight.
    ours.save_pretrained(tmp_path / "ours")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=STAGE1_LOGGER):
        again, info = Blip2BridgeModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not [record for record in caplog.records if record.name == STAGE1_LOGGER]
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_a_transformers_stage2_folder_is_refused_with_the_class_that_loads_it(tmp_path):
    # Only config.json is read before the refusal: a stage-2 config (no text input in its Q-Former) is enough.
    config = tiny_blip2_config(use_qformer_text_input=False)
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="transformers' Blip2ForConditionalGeneration, a stage-2 model: load it with Blip2BridgeForConditionalGeneration"):
        Blip2BridgeModel.from_pretrained(tmp_path)


def test_our_stage1_model_exports_to_transformers_with_identical_itm_and_itc_scores(tmp_path, caplog):
    ours = random_stage1_model()
    with caplog.at_level(logging.WARNING, logger=EXPORT_LOGGER):
        export_stage1_to_transformers(ours, tmp_path / "hf", tokenizer=make_bert_tokenizer())
    warnings = [record.getMessage() for record in caplog.records if record.name == EXPORT_LOGGER]
    assert len(warnings) == 1
    assert "holds no ITC temperature and no ITG head: the export leaves out temp (= 0.07" in warnings[0]
    assert all(name in warnings[0] for name in NOT_IN_BLIP2_RETRIEVAL if name.startswith("itg_head"))

    theirs, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf", output_loading_info=True)
    theirs.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert theirs.config.architectures == ["Blip2ForImageTextRetrieval"]
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()

    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    their_itm, their_itc = their_scores(theirs, pixel_values, input_ids, attention_mask)
    our_itm, our_itc, _ = our_scores(ours, pixel_values, input_ids, attention_mask)
    assert (their_itm - our_itm).abs().max() <= 1e-4
    assert (their_itc - our_itc).abs().max() <= 1e-4
    assert their_itm[:, 1].std() > 1e-2 and their_itc.std() > 1e-2

    # And back: the exported folder loads into ours with the same scores and the same [DEC]/[SEP] ids.
    back = Blip2BridgeModel.from_pretrained(tmp_path / "hf").eval()
    assert (back.config.qformer_config.bos_token_id, back.config.qformer_config.sep_token_id) == (DEC_ID, SEP_ID)
    back_itm, back_itc, _ = our_scores(back, pixel_values, input_ids, attention_mask)
    assert (back_itm - our_itm).abs().max() <= 1e-4 and (back_itc - our_itc).abs().max() <= 1e-4


def test_a_model_reading_the_penultimate_vision_layer_exports_the_tower_cut_after_it(tmp_path):
    ours = random_stage1_model(vision_feature_layer=-2)
    theirs = export_stage1_to_transformers(ours)
    assert theirs.config.vision_config.num_hidden_layers == 1
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    their_itm, their_itc = their_scores(theirs, pixel_values, input_ids, attention_mask)
    our_itm, our_itc, _ = our_scores(ours, pixel_values, input_ids, attention_mask)
    assert (their_itm - our_itm).abs().max() <= 1e-4 and (their_itc - our_itc).abs().max() <= 1e-4


def test_models_the_retrieval_format_cannot_express_are_refused():
    with pytest.raises(ValueError, match="model is a Blip2BridgeForConditionalGeneration; only a stage-1"):
        export_stage1_to_transformers(Blip2BridgeForConditionalGeneration(tiny_stage2_config()))
    clip = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    config = tiny_model().config
    with pytest.raises(ValueError, match="'clip_vision_model' model; transformers' BLIP-2 holds a Blip2VisionModel"):
        export_stage1_to_transformers(Blip2BridgeModel(Blip2BridgeConfig(**{**config.to_dict(), "vision_config": clip})))
    with pytest.raises(ValueError, match=r"vision_feature_layer=None; .* expected -1 to -2"):
        export_stage1_to_transformers(tiny_model(vision_feature_layer=None))


def test_the_exported_folder_also_loads_as_transformers_text_and_vision_models_with_projection(tmp_path):
    """transformers' `Blip2TextModelWithProjection` / `Blip2VisionModelWithProjection` read their part of a
    `Blip2ForImageTextRetrieval` folder (as of Salesforce/blip2-itm-vit-g): our ITC features come out of them."""
    from transformers import Blip2TextModelWithProjection, Blip2VisionModelWithProjection

    ours = random_stage1_model()
    export_stage1_to_transformers(ours, tmp_path)
    text_model, text_info = Blip2TextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    vision_model, vision_info = Blip2VisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert text_info["missing_keys"] == set() and vision_info["missing_keys"] == set()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    with torch.no_grad():
        their_text = text_model.eval()(input_ids=input_ids, attention_mask=attention_mask).text_embeds[:, 0]
        their_image = vision_model.eval()(pixel_values=pixel_values).image_embeds
        our_text = ours.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        our_image = ours.get_image_features(pixel_values=pixel_values).pooler_output
    assert (their_text - our_text).abs().max() <= 1e-4
    assert (their_image - our_image).abs().max() <= 1e-4
