"""Stage 2: projected queries prompt a frozen LLM; transformers' own BLIP-2 checkpoints load with identical outputs."""

import logging

import huggingface_hub.constants
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, Blip2Config, Blip2ForConditionalGeneration

from modeling_blip2 import (
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeImageProcessor,
    Blip2BridgeModel,
    Blip2BridgeProcessor,
)
from tests.tiny_models import (
    IMAGE_TOKEN_ID,
    NUM_QUERY_TOKENS,
    QFORMER_CONFIG,
    STAGE2_VOCAB_SIZE,
    TEXT_CONFIGS,
    VISION_CONFIG,
    decoder_inputs,
    prompts,
    tiny_stage2,
    tiny_stage2_config,
)



@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def model_pair(request, tmp_path_factory):
    """transformers' BLIP-2 with random (non-trivial) weights, saved, and ours loaded from that save."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=VISION_CONFIG,
        qformer_config=QFORMER_CONFIG,
        text_config=TEXT_CONFIGS[request.param],
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN_ID,
    )
    reference = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # query tokens start at zero, norms at one: make every weight count
            parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp(f"blip2_{request.param}")
    reference.save_pretrained(path)
    return request.param, reference, Blip2BridgeForConditionalGeneration.from_pretrained(path).eval()


def test_transformers_blip2_checkpoint_gives_identical_logits_and_loss(model_pair):
    name, reference, ours = model_pair
    pixel_values, input_ids, attention_mask = prompts()
    kwargs = decoder_inputs(name)
    if name == "opt":
        kwargs["labels"] = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        actual = ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert expected.logits.abs().max() > 0.5  # a random model whose logits differ visibly
    assert (actual.logits - expected.logits).abs().max() <= 1e-4
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    # transformers' post_layernorm is our vision_layernorm; ours stays at its unused identity initialisation.
    torch.testing.assert_close(ours.vision_layernorm.weight, reference.vision_model.post_layernorm.weight)
    assert ours.vision_layernorm.eps == reference.config.vision_config.layer_norm_eps
    unused_norm = ours.vision_model.post_layernorm.weight
    assert torch.equal(unused_norm, torch.ones_like(unused_norm))


@pytest.mark.parametrize(
    "generate_kwargs",
    [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3), dict(max_new_tokens=6, do_sample=True, top_k=5)],
    ids=["greedy", "beam", "sample"],
)
def test_transformers_blip2_checkpoint_generates_identical_tokens(model_pair, generate_kwargs):
    name, reference, ours = model_pair
    pixel_values, input_ids, attention_mask = prompts(left_pad=name == "opt")
    torch.manual_seed(3)
    expected = reference.generate(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
    )
    torch.manual_seed(3)
    actual = ours.generate(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
    )
    assert actual.tolist() == expected.tolist()
    assert actual.shape[0] == 2


def test_captioning_without_prompt_starts_from_the_placeholders(model_pair):
    name, reference, ours = model_pair
    pixel_values = prompts()[0]
    actual = ours.generate(pixel_values=pixel_values, max_new_tokens=5)
    if name == "opt":  # transformers' captioning: placeholders + BOS
        assert actual.tolist() == reference.generate(pixel_values=pixel_values, max_new_tokens=5).tolist()
        assert actual[:, :NUM_QUERY_TOKENS].eq(IMAGE_TOKEN_ID).all() and actual[:, NUM_QUERY_TOKENS].eq(2).all()
    else:  # T5 has no BOS; an empty prompt tokenizes to EOS, as the original's FlanT5 captioning
        start = torch.tensor([[IMAGE_TOKEN_ID] * NUM_QUERY_TOKENS + [1]] * 2)
        assert actual.tolist() == ours.generate(pixel_values=pixel_values, input_ids=start, max_new_tokens=5).tolist()


def test_precomputed_image_features_answer_three_questions_like_full_calls(model_pair):
    name, _, ours = model_pair
    pixel_values = prompts(batch_size=1)[0]
    with torch.no_grad():
        image_features = ours.get_image_features(pixel_values).pooler_output
        from_embeds = ours.get_image_features(image_embeds=ours.get_image_embeds(pixel_values)).pooler_output
        assert image_features.shape == (1, NUM_QUERY_TOKENS, ours.config.text_config.hidden_size)
        torch.testing.assert_close(from_embeds, image_features, rtol=0, atol=0)
        for seed in range(3):
            _, input_ids, _ = prompts(batch_size=1, seed=10 + seed)
            kwargs = decoder_inputs(name, batch_size=1)
            full = ours(pixel_values=pixel_values, input_ids=input_ids, **kwargs).logits
            cached = ours(image_features=image_features, input_ids=input_ids, **kwargs).logits
            assert torch.equal(cached, full)
            assert ours.generate(image_features=image_features, input_ids=input_ids, max_new_tokens=4).tolist() == (
                ours.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=4).tolist()
            )


# Encoder-decoder targets are the decoder's labels, which the LLM itself scores: only the decoder-only path is ours.
@pytest.mark.parametrize("model_pair", ["opt"], indirect=True)
def test_decoder_only_loss_is_cross_entropy_on_the_text_positions_only(model_pair):
    name, _, ours = model_pair
    pixel_values, input_ids, attention_mask = prompts(text_length=6)
    labels = input_ids.clone()  # placeholders included: the model must ignore them
    labels[1, -2:] = -100
    with torch.no_grad():
        output = ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    targets = labels[:, 1:].masked_fill(input_ids[:, 1:] == IMAGE_TOKEN_ID, -100)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, STAGE2_VOCAB_SIZE), targets.reshape(-1), ignore_index=-100)
    assert (targets != -100).sum() == 2 * 6 - 2  # the first text token is predicted from the last image position
    assert abs(output.loss.item() - expected.item()) <= 1e-6


def test_only_queries_qformer_and_projection_train_while_vision_and_llm_stay_frozen(tmp_path):
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config()).train()
    model.save_pretrained(tmp_path)
    for candidate in (model, Blip2BridgeForConditionalGeneration.from_pretrained(tmp_path).train()):
        assert not candidate.vision_model.training  # the frozen encoder stays in eval mode
        pixel_values, input_ids, attention_mask = prompts()
        candidate(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss.backward()
        parameters = dict(candidate.named_parameters())
        frozen = [p for n, p in parameters.items() if n.startswith(("vision_model.", "language_model."))]
        assert all(p.grad is None and not p.requires_grad for p in frozen)
        trainable = ("query_tokens", "qformer.", "language_projection.")
        trained = [p for n, p in parameters.items() if n.startswith(trainable)]
        assert len(trained) > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_loading_keeps_the_stage1_vision_encoder_frozen(tmp_path):
    from tests.tiny_models import tiny_model

    tiny_model().save_pretrained(tmp_path)
    loaded = Blip2BridgeModel.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())
    assert loaded.query_tokens.requires_grad


def test_freeze_language_model_false_trains_the_llm():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(freeze_language_model=False))
    assert all(p.requires_grad for p in model.language_model.parameters())


def test_stage2_carries_no_stage1_text_weights():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(text="t5"))
    stage1_only = (
        "word_embeddings", "position_embeddings", "text_feed_forward", "itm_head", "itg_head", "vision_proj",
        "text_proj", "temp",
    )  # fmt: skip
    keys = [key for key in model.state_dict() if not key.startswith("language_model.")]
    assert not [key for key in keys if any(part in key for part in stage1_only)]
    assert model.config.qformer_config.use_text_input is False


def test_qformer_configured_with_text_input_keeps_its_config_and_its_text_weights_unused(tmp_path):
    config = tiny_stage2_config(use_text_input=True)
    torch.manual_seed(0)
    with_text = Blip2BridgeForConditionalGeneration(config).eval()
    assert config.qformer_config.use_text_input is True  # the model reads its config as given
    without_text = Blip2BridgeForConditionalGeneration(tiny_stage2_config()).eval()
    loading = without_text.load_state_dict(with_text.state_dict(), strict=False)
    assert loading.missing_keys == []
    text_side = ("qformer.word_embeddings.", "qformer.position_embeddings.", ".text_feed_forward.")
    assert len(loading.unexpected_keys) == 2 + 6 * QFORMER_CONFIG["num_hidden_layers"]
    assert all(any(part in key for part in text_side) for key in loading.unexpected_keys)
    pixel_values, input_ids, attention_mask = prompts()
    with torch.no_grad():
        expected = without_text(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        actual = with_text(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(actual, expected)
    with_text.save_pretrained(tmp_path)
    reloaded = Blip2BridgeForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.qformer_config.use_text_input is True
    assert torch.equal(reloaded.qformer.word_embeddings.weight, with_text.qformer.word_embeddings.weight)


def test_hidden_states_and_attentions_are_the_language_models_and_return_dict_false_gives_a_tuple():
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(attn_implementation="eager")).eval()
    pixel_values, input_ids, attention_mask = prompts(left_pad=True)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    inputs["labels"] = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        plain = model(**inputs)
        recorded = model(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, return_dict=False)
    llm = TEXT_CONFIGS["opt"]
    batch_size, length = input_ids.shape
    hidden_states = recorded.language_model_outputs.hidden_states
    attentions = recorded.language_model_outputs.attentions
    assert len(hidden_states) == llm["num_hidden_layers"] + 1
    assert all(tuple(state.shape) == (batch_size, length, llm["hidden_size"]) for state in hidden_states)
    assert len(attentions) == llm["num_hidden_layers"]
    assert all(tuple(weights.shape) == (batch_size, llm["num_attention_heads"], length, length) for weights in attentions)
    # Causal weights summing to one, the left padding of the second prompt unseen (rows past the padding).
    weights = attentions[0][:, :, 2:]
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch_size, llm["num_attention_heads"], length - 2))
    future_keys = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)[2:]
    assert weights[:, :, future_keys].abs().max() == 0 and weights[1, :, :, :2].abs().max() == 0
    assert weights[0, :, :, :2].min() > 0
    # The last hidden state is what the LM head reads.
    torch.testing.assert_close(model.get_output_embeddings()(hidden_states[-1]), recorded.logits, rtol=0, atol=1e-6)
    assert torch.equal(recorded.logits, plain.logits)
    assert plain.language_model_outputs.hidden_states is None and plain.language_model_outputs.attentions is None

    # loss, logits, image_features, the LLM's outputs, the image outputs
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 5
    assert torch.equal(as_tuple[0], plain.loss) and plain.loss.item() > 0
    assert torch.equal(as_tuple[1], plain.logits) and torch.equal(as_tuple[2], plain.image_features)
    assert isinstance(as_tuple[3], tuple) and isinstance(as_tuple[4], tuple)
    # The image side reports the tower's and the query pass's own hidden states and attentions.
    image_outputs = recorded.image_outputs
    vision_layers = model.config.vision_config.num_hidden_layers
    assert len(image_outputs.hidden_states) == vision_layers + 1 and len(image_outputs.attentions) == vision_layers
    assert len(image_outputs.qformer_outputs.hidden_states) == model.config.qformer_config.num_hidden_layers + 1
    torch.testing.assert_close(image_outputs.pooler_output, plain.image_features)


def test_mm_encoder_outputs_which_stage2_cannot_honour_are_refused_by_name():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(attn_implementation="sdpa")).eval()
    pixel_values, input_ids, _ = prompts()
    with pytest.raises(ValueError, match=r"mm_encoder_outputs is not taken"):
        model(pixel_values=pixel_values, input_ids=input_ids, mm_encoder_outputs={"image": None, "x": 1})
    with torch.no_grad():  # their "off" values ask for nothing
        model(pixel_values=pixel_values, input_ids=input_ids, mm_encoder_outputs=None, output_attentions=False)


def test_output_attentions_under_sdpa_warns_why_attentions_may_be_missing_and_only_then(caplog):
    from modeling_blip2.modeling_stage2 import logger

    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(attn_implementation="sdpa")).eval()
    pixel_values, input_ids, _ = prompts()
    logger.warning_once.cache_clear()  # each message may come again
    def ours():  # transformers' sdpa integration adds a warning of its own
        return [record.getMessage() for record in caplog.records if record.name == logger.name]

    with caplog.at_level(logging.WARNING, logger=logger.name), torch.no_grad():
        model(pixel_values=pixel_values, input_ids=input_ids)
        assert ours() == []  # nothing asked, nothing to warn about
        model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True)
    assert ours() == [
        "output_attentions=True, but the language model runs 'sdpa' attention, which may compute no attention weights; "
        "load the model with attn_implementation='eager' to get them"
    ]


def test_pre_shifted_targets_give_the_loss_of_the_labels_they_shift():
    # Sequence-parallel training hands the model shift_labels (the target of logit t): the loss must be taken
    # against them, image positions excluded as for labels.
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config()).eval()
    pixel_values, input_ids, attention_mask = prompts()
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    shifted = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # image placeholders left in: masked
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        from_labels = model(**inputs, labels=labels).loss
        from_shift_labels = model(**inputs, labels=labels, shift_labels=shifted).loss
        other_targets = model(**inputs, labels=labels, shift_labels=shifted.roll(1, dims=1)).loss
    torch.testing.assert_close(from_shift_labels, from_labels)
    assert (other_targets - from_labels).abs() > 1e-3


@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
def test_save_and_load_through_auto_class_gives_identical_outputs(tmp_path, text):
    import modeling_blip2  # noqa: F401  (registers the Auto classes)

    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(text)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is Blip2BridgeForConditionalGeneration
    pixel_values, input_ids, attention_mask = prompts()
    kwargs = decoder_inputs(text)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        actual = loaded(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(actual.logits, expected.logits)
    assert loaded.generate(pixel_values=pixel_values, max_new_tokens=4).tolist() == (
        model.generate(pixel_values=pixel_values, max_new_tokens=4).tolist()
    )


def test_transformers_checkpoint_resaved_by_us_loads_again(model_pair, tmp_path):
    name, _, ours = model_pair
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is Blip2BridgeForConditionalGeneration
    pixel_values, input_ids, attention_mask = prompts()
    with torch.no_grad():
        expected = ours(pixel_values=pixel_values, input_ids=input_ids, **decoder_inputs(name)).logits
        actual = loaded(pixel_values=pixel_values, input_ids=input_ids, **decoder_inputs(name)).logits
    assert torch.equal(actual, expected)


def test_wrong_placeholder_count_is_a_clear_error():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config())
    pixel_values, input_ids, _ = prompts()
    input_ids[1, 0] = 5
    expected = r"rows hold \[4, 3\] image placeholder tokens \(id 98\); expected num_query_tokens=4"
    with pytest.raises(ValueError, match=expected):
        model(pixel_values=pixel_values, input_ids=input_ids)
    with pytest.raises(ValueError, match=r"\[4, 3\] image placeholder"):
        model.generate(pixel_values=pixel_values, input_ids=input_ids)


def test_images_and_prompts_of_different_batch_sizes_are_a_clear_error():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config())
    pixel_values, input_ids, _ = prompts(batch_size=3)
    with pytest.raises(ValueError, match="input_ids has batch size 3 but there are 2 images"):
        model(pixel_values=pixel_values[:2], input_ids=input_ids)
    with pytest.raises(ValueError, match="input_ids has batch size 3 but there are 1 images"):
        model.generate(image_features=model.get_image_features(pixel_values[:1]).pooler_output, input_ids=input_ids)


def test_processor_resizing_to_another_size_than_the_tower_is_a_clear_error_at_generate():
    model, tiny_processor = tiny_stage2("opt")
    # The default image processor resizes to 224 px, as BLIP-2's; this tower takes 28 px.
    processor = Blip2BridgeProcessor(
        Blip2BridgeImageProcessor(), tiny_processor.tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    image = PIL.Image.new("RGB", (40, 30), "red")
    inputs = processor(images=image, text="a photo of")
    with pytest.raises(ValueError, match=r"pixel_values are 224x224 pixels .* expects 28x28 \(vision_config.image_size\)"):
        model.generate(**inputs, max_new_tokens=3)


@pytest.mark.parametrize("model_class", [Blip2BridgeModel, Blip2BridgeForConditionalGeneration])
def test_from_pretrained_of_a_missing_folder_says_the_folder_is_missing(tmp_path, monkeypatch, model_class):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=r"^model folder \./my-blip2 does not exist"):
        model_class.from_pretrained("./my-blip2")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    # A bare name may be a hub id too: the hub's own error follows the missing folder.
    with pytest.raises(OSError, match=r"^no local folder my-blip2 exists, and as a hub id it could not be loaded: "):
        model_class.from_pretrained("my-blip2")


def test_half_precision_loading_keeps_the_queries_and_qformer_in_float32(tmp_path):
    # As transformers' BLIP-2 (and against fp16 overflow in the Q-Former, LAVIS issue 267): dtype=float16 loads the
    # tower and the LLM in half precision, the queries and the Q-Former in float32.
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config()).eval()
    model.save_pretrained(tmp_path)
    half = Blip2BridgeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert half.query_tokens.dtype == torch.float32
    assert {p.dtype for n, p in half.named_parameters() if n.startswith("qformer.")} == {torch.float32}
    assert {p.dtype for n, p in half.named_parameters() if n.startswith(("vision_model.", "language_model."))} == {
        torch.float16
    }
    pixel_values, input_ids, attention_mask = prompts()
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        full_loss, half_loss = model(**inputs).loss, half(**inputs).loss
    assert half_loss.dtype == torch.float16 or half_loss.dtype == torch.float32
    assert abs(half_loss.float().item() - full_loss.item()) < 0.02


def test_missing_llm_weights_are_initialised_by_the_llms_own_scheme():
    # T5 initialises its attention projections at the attention block (q: std (d_model * d_kv) ** -0.5); a composite
    # model that transformers took for custom code skipped such blocks, leaving normal(1) weights.
    config = tiny_stage2_config("t5")
    model = Blip2BridgeForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    text = config.text_config
    expected_std = (text.d_model * text.d_kv) ** -0.5
    for name, weight in model.language_model.named_parameters():
        if name.endswith("SelfAttention.q.weight"):
            assert abs(weight.std().item() - expected_std) < 0.3 * expected_std, (name, weight.std().item())
    assert abs(model.query_tokens.std().item() - config.initializer_range) < 0.5 * config.initializer_range


def test_image_features_of_the_wrong_width_are_refused_with_the_expected_shape():
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config()).eval()
    _, input_ids, attention_mask = prompts()
    width = model.config.text_config.hidden_size
    wrong = torch.zeros(input_ids.shape[0], NUM_QUERY_TOKENS, width + 1)
    with pytest.raises(ValueError, match=rf"image_features has shape .*; expected \(batch, {NUM_QUERY_TOKENS}, {width}\)"):
        model(image_features=wrong, input_ids=input_ids, attention_mask=attention_mask)
