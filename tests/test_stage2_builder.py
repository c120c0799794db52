"""The stage-2 builder: a stage-1 model's vision side, queries and Q-Former in front of a pretrained LLM."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText, OPTModel

from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeImageProcessor, Blip2BridgeProcessor
from modeling_blip2.builders import build_stage2_model
from tests.helpers import make_llm_tokenizer
from tests.tiny_models import LLM_VOCAB_SIZE, NUM_QUERY_TOKENS, TEXT_CONFIGS, tiny_llm, tiny_model


def stage1_and_stage2(name: str = "opt", vocab_size: int = LLM_VOCAB_SIZE):
    """A tiny stage-1 model, the LLM as it was before building, and the stage-2 model built from both."""
    stage1 = tiny_model(attn_implementation="sdpa").eval()  # as the stage-2 model's default
    language_model = tiny_llm(name, vocab_size)
    reference_llm = copy.deepcopy(language_model)
    tokenizer = make_llm_tokenizer(name)
    stage2 = build_stage2_model(stage1, language_model, tokenizer=tokenizer)
    return stage1, reference_llm, stage2, tokenizer


def images(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def prompt_ids(tokenizer, image_token_id: int, texts=("a photo of a cat", "two dogs run")) -> torch.Tensor:
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    placeholders = torch.full((len(texts), NUM_QUERY_TOKENS), image_token_id)
    return torch.cat([placeholders, encoded.input_ids], dim=1), encoded


def test_query_outputs_equal_the_stage1_models_on_the_same_images():
    stage1, _, stage2, _ = stage1_and_stage2()
    pixel_values = images()
    with torch.no_grad():
        expected = stage1.get_query_output(stage1.get_image_embeds(pixel_values)).last_hidden_state
        actual = stage2.get_query_output(stage2.get_image_embeds(pixel_values)).last_hidden_state
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_logits_equal_the_standalone_llm_given_the_projected_queries_and_the_text(name):
    stage1, reference_llm, stage2, tokenizer = stage1_and_stage2(name)
    pixel_values = images()
    input_ids, text = prompt_ids(tokenizer, stage2.config.image_token_id)
    attention_mask = torch.cat([torch.ones(2, NUM_QUERY_TOKENS, dtype=torch.long), text.attention_mask], dim=1)
    decoder = {"decoder_input_ids": text.input_ids} if name == "t5" else {}
    with torch.no_grad():
        query_output = stage1.get_query_output(stage1.get_image_embeds(pixel_values)).last_hidden_state
        prefix = stage2.language_projection(query_output)
        inputs_embeds = torch.cat([prefix, reference_llm.get_input_embeddings()(text.input_ids)], dim=1)
        expected = reference_llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **decoder).logits
        actual = stage2(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **decoder).logits
        # Text alone: the LLM inside is the pretrained one, unchanged.
        text_only = stage2.language_model(**text, **decoder).logits
        expected_text_only = reference_llm(**text, **decoder).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(text_only, expected_text_only, rtol=0, atol=0)


def test_image_token_is_added_to_the_tokenizer_and_the_embeddings_grow_only_when_needed():
    tokenizer = make_llm_tokenizer("opt")
    size = len(tokenizer)
    roomy = build_stage2_model(tiny_model(), tiny_llm(), tokenizer=tokenizer)
    assert tokenizer.convert_ids_to_tokens(roomy.config.image_token_id) == "<image>"
    assert roomy.config.image_token_id == size and len(tokenizer) == size + 1
    assert roomy.language_model.get_input_embeddings().weight.shape[0] == LLM_VOCAB_SIZE  # padded table: room
    ids = tokenizer("<image><image> a cat").input_ids
    assert ids[:3] == [2, size, size] and size not in ids[3:]  # one id per placeholder, never split

    exact_llm = tiny_llm(vocab_size=size)
    reference = copy.deepcopy(exact_llm)
    grown = build_stage2_model(tiny_model(), exact_llm, tokenizer=make_llm_tokenizer("opt"))
    assert grown.config.image_token_id == size
    assert grown.language_model.get_input_embeddings().weight.shape[0] == size + 1
    assert grown.config.text_config.vocab_size == size + 1
    # The old rows are untouched.
    torch.testing.assert_close(
        grown.language_model.get_input_embeddings().weight[:size], reference.get_input_embeddings().weight
    )

    # The token the stage-2 processor puts before every prompt: the same id, the tokenizer unchanged.
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    assert processor.image_token_id == roomy.config.image_token_id and len(tokenizer) == size + 1

    appended = build_stage2_model(tiny_model(), tiny_llm(vocab_size=53))  # no tokenizer: one new row
    assert appended.config.image_token_id == 53
    assert appended.language_model.get_input_embeddings().weight.shape[0] == 54


def hand_counted_trainable_parameters(stage1_config, llm_width: int) -> int:
    qformer = stage1_config.qformer_config
    h, i, v = qformer.hidden_size, qformer.intermediate_size, stage1_config.vision_config.hidden_size
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    layernorm = 2 * h
    self_attention = 4 * linear(h, h) + layernorm
    cross_attention = linear(h, h) + 2 * linear(v, h) + linear(h, h) + layernorm
    query_feed_forward = linear(h, i) + linear(i, h) + layernorm
    layers = sum(
        self_attention + query_feed_forward + (cross_attention if index % qformer.cross_attention_frequency == 0 else 0)
        for index in range(qformer.num_hidden_layers)
    )
    queries = stage1_config.num_query_tokens * h
    vision_layernorm = 2 * v
    return vision_layernorm + queries + layernorm + layers + linear(h, llm_width)


def test_only_vision_layernorm_queries_qformer_and_projection_train_and_their_count_is_as_computed_by_hand():
    stage1, _, stage2, tokenizer = stage1_and_stage2()
    trainable = {name: p for name, p in stage2.named_parameters() if p.requires_grad}
    # vision_layernorm (LAVIS's ln_vision) trains with the Q-Former, as in the original; the encoder itself is frozen.
    trained_parts = ("vision_layernorm.", "query_tokens", "qformer.", "language_projection.")
    assert all(name.startswith(trained_parts) for name in trainable)
    assert not any(p.requires_grad for p in stage2.vision_model.parameters())
    assert not any(p.requires_grad for p in stage2.language_model.parameters())
    expected = hand_counted_trainable_parameters(stage1.config, TEXT_CONFIGS["opt"]["hidden_size"])
    assert sum(p.numel() for p in trainable.values()) == expected == 42_496

    stage2.train()
    assert not stage2.vision_model.training
    input_ids, _ = prompt_ids(tokenizer, stage2.config.image_token_id)
    stage2(pixel_values=images(), input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for name, p in stage2.named_parameters() if name not in trainable)
    # The stage-1 model the weights came from does not share them.
    assert stage1.query_tokens.grad is None


def test_vision_and_query_path_are_copied_and_the_stage1_text_side_is_not_carried():
    stage1, _, stage2, _ = stage1_and_stage2()
    stage1_weights, stage2_weights = stage1.state_dict(), stage2.state_dict()
    carried = [name for name in stage2_weights if not name.startswith(("language_model.", "language_projection."))]
    assert len(carried) > 50
    for name in carried:
        torch.testing.assert_close(stage2_weights[name], stage1_weights[name], rtol=0, atol=0, msg=name)
    assert stage2.qformer.layer[0].query_feed_forward.intermediate.weight.data_ptr() != (
        stage1.qformer.layer[0].query_feed_forward.intermediate.weight.data_ptr()
    )
    not_carried = set(stage1_weights) - set(carried)
    text_side = ("qformer.word_embeddings.", "qformer.position_embeddings.", "itg_head.", "itm_head.", "vision_proj.")
    text_side += ("text_proj.", "temp")
    assert not_carried and all(name.startswith(text_side) or ".text_feed_forward." in name for name in not_carried)
    assert stage2.config.qformer_config.use_text_input is False
    assert stage2.config.vision_feature_layer == stage1.config.vision_feature_layer


def test_new_projection_is_initialised_as_transformers_blip2():
    _, _, stage2, _ = stage1_and_stage2()
    weight, bias = stage2.language_projection.weight, stage2.language_projection.bias
    std = stage2.config.initializer_range  # normal(0, initializer_range), zero bias, as Blip2PreTrainedModel
    assert weight.shape == (TEXT_CONFIGS["opt"]["hidden_size"], 32)
    assert abs(weight.std().item() - std) < 0.15 * std and abs(weight.mean().item()) < 0.1 * std
    assert torch.equal(bias, torch.zeros_like(bias))


def test_build_from_saved_folders_saves_and_loads_back(tmp_path):
    stage1 = tiny_model()
    stage1.save_pretrained(tmp_path / "stage1")
    tiny_llm().save_pretrained(tmp_path / "llm")
    from_paths = build_stage2_model(tmp_path / "stage1", tmp_path / "llm", tokenizer=make_llm_tokenizer("opt"))
    from_objects = build_stage2_model(stage1, tiny_llm(), tokenizer=make_llm_tokenizer("opt"))
    # Only the new projection differs (its random initialisation).
    from_objects.language_projection.load_state_dict(from_paths.language_projection.state_dict())
    from_paths.save_pretrained(tmp_path / "stage2")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage2")
    assert type(reloaded) is Blip2BridgeForConditionalGeneration

    input_ids, _ = prompt_ids(make_llm_tokenizer("opt"), from_paths.config.image_token_id)
    with torch.no_grad():
        logits = [m(pixel_values=images(), input_ids=input_ids).logits for m in (from_paths, from_objects, reloaded)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    torch.testing.assert_close(logits[2], logits[0], rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.language_model.parameters())


def test_wrong_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="language_model is a OPTModel; expected a language model with its LM head"):
        build_stage2_model(tiny_model(), OPTModel(tiny_llm().config))
    stage2 = stage1_and_stage2()[2]
    with pytest.raises(TypeError, match="stage1_model is a Blip2BridgeForConditionalGeneration; expected a stage-1"):
        build_stage2_model(stage2, tiny_llm())
    with pytest.raises(ValueError, match="image_token_id=5 and a tokenizer were both given"):
        build_stage2_model(tiny_model(), tiny_llm(), tokenizer=make_llm_tokenizer("opt"), image_token_id=5)


def test_an_instruction_aware_build_keeps_the_stage1_text_side_and_its_queries_read_the_instruction():
    # InstructBLIP starts from BLIP-2: the Q-Former's text side comes from stage 1, and the queries' outputs over an
    # instruction are exactly stage 1's Q-Former over [queries; instruction] (its ITM mode), queries kept.
    stage1 = tiny_model(attn_implementation="sdpa").eval()
    tokenizer = make_llm_tokenizer("opt")
    stage2 = build_stage2_model(stage1, tiny_llm("opt"), tokenizer=tokenizer, instruction_aware=True)
    assert stage2.config.qformer_config.use_text_input
    assert torch.equal(stage2.qformer.word_embeddings.weight, stage1.qformer.word_embeddings.weight)
    assert stage2.qformer.word_embeddings.weight.data_ptr() != stage1.qformer.word_embeddings.weight.data_ptr()
    pixel_values = images()
    instruction = torch.tensor([[2, 17, 33, 3], [2, 40, 3, 0]])
    mask = (instruction != 0).long()
    with torch.no_grad():
        image_embeds = stage1.get_image_embeds(pixel_values)
        expected = stage1.qformer(
            input_ids=instruction, attention_mask=mask, query_embeds=stage1.query_tokens, image_embeds=image_embeds
        ).last_hidden_state[:, :NUM_QUERY_TOKENS]
        actual = stage2.get_image_features(pixel_values, qformer_input_ids=instruction, qformer_attention_mask=mask)
        without = stage2.get_image_features(pixel_values).query_output
    torch.testing.assert_close(actual.query_output, expected, rtol=0, atol=1e-6)
    assert (actual.query_output - without).abs().max() > 1e-3  # the instruction changes what the queries read
    plain = build_stage2_model(stage1, tiny_llm("opt"), tokenizer=make_llm_tokenizer("opt"))
    assert not plain.config.qformer_config.use_text_input and not hasattr(plain.qformer, "word_embeddings")
