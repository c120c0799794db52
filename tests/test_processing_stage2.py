"""Blip2BridgeProcessor for a stage-2 model: the language model's tokens after the image placeholders, exactly as
transformers' Blip2Processor, whose saved files it also loads."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, BlipImageProcessor, Blip2Processor

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2.processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from tests.helpers import make_llm_tokenizer

NUM_QUERY_TOKENS = 4
PROMPTS = ["Question: what is in the picture? Answer:", "a photo of", "two dogs run across a green field"]


def images(count: int = 3, size: int = 20) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(count)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)) for _ in range(count)]


def stage2_processor(kind: str, padding_side: str = "right") -> Blip2BridgeProcessor:
    tokenizer = make_llm_tokenizer(kind, padding_side=padding_side)
    return Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


def transformers_processor(kind: str, padding_side: str = "right") -> Blip2Processor:
    tokenizer = make_llm_tokenizer(kind, padding_side=padding_side)
    return Blip2Processor(BlipImageProcessor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_image_token_is_added_once_as_a_special_token_after_the_vocabulary(kind):
    vocabulary_size = len(make_llm_tokenizer(kind))
    processor = stage2_processor(kind)

    assert processor.image_token == "<image>"
    assert processor.image_token_id == vocabulary_size  # a new id, the model's config.image_token_id
    assert len(processor.tokenizer) == vocabulary_size + 1
    assert processor.image_token_id == transformers_processor(kind).tokenizer.convert_tokens_to_ids("<image>")
    # "<image>" in a prompt is the special token, never split into pieces
    assert processor.tokenizer("<image>", add_special_tokens=False)["input_ids"] == [processor.image_token_id]
    again = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), processor.tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    assert len(again.tokenizer) == vocabulary_size + 1 and again.image_token_id == vocabulary_size


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_token_ids_equal_transformers_blip2_processor(kind, padding_side):
    ours, theirs = stage2_processor(kind, padding_side), transformers_processor(kind, padding_side)
    batch = images()

    actual = ours(images=batch, text=PROMPTS, padding="longest")
    expected = theirs(images=batch, text=PROMPTS, padding="longest", return_tensors="pt")

    assert actual["input_ids"].tolist() == expected["input_ids"].tolist()
    assert actual["attention_mask"].tolist() == expected["attention_mask"].tolist()
    assert set(actual) == {"pixel_values", "input_ids", "attention_mask"}
    tokenizer = ours.tokenizer
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        padding = [tokenizer.pad_token_id] * (actual["input_ids"].shape[1] - NUM_QUERY_TOKENS - len(ids))
        text_part = ids + padding if padding_side == "right" else padding + ids
        assert actual["input_ids"][row].tolist() == [ours.image_token_id] * NUM_QUERY_TOKENS + text_part
        mask = [1] * len(ids) + [0] * len(padding) if padding_side == "right" else [0] * len(padding) + [1] * len(ids)
        assert actual["attention_mask"][row].tolist() == [1] * NUM_QUERY_TOKENS + mask


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_max_length_counts_the_placeholders_like_transformers(kind):
    ours, theirs = stage2_processor(kind), transformers_processor(kind)
    batch = images()
    kwargs = dict(padding="max_length", truncation=True, max_length=NUM_QUERY_TOKENS + 6)

    actual = ours(images=batch, text=PROMPTS, **kwargs)
    expected = theirs(images=batch, text=PROMPTS, return_tensors="pt", **kwargs)

    assert actual["input_ids"].shape == (3, NUM_QUERY_TOKENS + 6)
    assert actual["input_ids"].tolist() == expected["input_ids"].tolist()
    assert actual["attention_mask"].tolist() == expected["attention_mask"].tolist()


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_text_alone_gets_no_placeholders_like_transformers(kind):
    ours, theirs = stage2_processor(kind), transformers_processor(kind)
    actual = ours(text=PROMPTS)
    expected = theirs(text=PROMPTS, padding="longest", return_tensors="pt")
    assert actual["input_ids"].tolist() == expected["input_ids"].tolist()
    assert (actual["input_ids"] != ours.image_token_id).all()


@pytest.mark.parametrize(("kind", "start_token_id"), [("opt", 2), ("t5", 1)])
def test_empty_prompt_is_the_placeholders_and_the_llm_start_token(kind, start_token_id):
    processor = stage2_processor(kind)
    inputs = processor(images=images(2), text="")
    # OPT's tokenizer starts a text with </s> (its BOS, id 2); T5's ends one with </s> (id 1): what the model's
    # generate() starts from when captioning without a prompt.
    expected_row = [processor.image_token_id] * NUM_QUERY_TOKENS + [start_token_id]
    assert inputs["input_ids"].tolist() == [expected_row, expected_row]
    assert inputs["attention_mask"].tolist() == [[1] * (NUM_QUERY_TOKENS + 1)] * 2


def test_pixel_values_equal_the_image_processor_output():
    processor = stage2_processor("opt")
    batch = images()
    torch.testing.assert_close(
        processor(images=batch, text=PROMPTS)["pixel_values"],
        processor.image_processor(batch)["pixel_values"],
        rtol=0,
        atol=0,
    )


def test_collator_call_with_prompt_and_target_texts_keeps_the_blip2_contract():
    """Training collators pass prompt + target strings in one list, as to transformers' Blip2Processor."""
    ours, theirs = stage2_processor("opt"), transformers_processor("opt")
    texts = [prompt + " a cat" for prompt in PROMPTS]
    batch = images()
    actual = ours(images=batch, text=texts, padding="longest", return_tensors="pt")
    expected = theirs(images=batch, text=texts, padding="longest", return_tensors="pt")
    for name in ("input_ids", "attention_mask"):
        assert actual[name].tolist() == expected[name].tolist()
    # per-row placeholder count is what the model checks
    assert (actual["input_ids"] == ours.image_token_id).sum(dim=1).tolist() == [NUM_QUERY_TOKENS] * 3


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_loads_transformers_blip2_processor_files_with_identical_outputs(kind, tmp_path):
    theirs = transformers_processor(kind, padding_side="left")
    theirs.save_pretrained(tmp_path)

    ours = Blip2BridgeProcessor.from_pretrained(tmp_path)

    assert type(ours.image_processor) is type(theirs.image_processor)
    assert ours.num_query_tokens == NUM_QUERY_TOKENS
    assert ours.image_token_id == theirs.tokenizer.convert_tokens_to_ids("<image>")
    assert len(ours.tokenizer) == len(theirs.tokenizer)
    assert ours.tokenizer.padding_side == "left"
    batch = images()
    actual = ours(images=batch, text=PROMPTS)
    expected = theirs(images=batch, text=PROMPTS, padding="longest", return_tensors="pt")
    assert actual["input_ids"].tolist() == expected["input_ids"].tolist()
    assert actual["attention_mask"].tolist() == expected["attention_mask"].tolist()
    torch.testing.assert_close(actual["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_processor_round_trip_keeps_num_query_tokens_and_ids(kind, tmp_path):
    processor = stage2_processor(kind, padding_side="left")
    batch = images()
    expected = processor(images=batch, text=PROMPTS)
    processor.save_pretrained(tmp_path)

    for loaded in (Blip2BridgeProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Blip2BridgeProcessor
        assert loaded.num_query_tokens == NUM_QUERY_TOKENS and loaded.image_token_id == processor.image_token_id
        outputs = loaded(images=batch, text=PROMPTS)
        for name in expected:
            torch.testing.assert_close(outputs[name], expected[name], rtol=0, atol=0)


def test_decode_skips_placeholders_and_special_tokens():
    processor = stage2_processor("opt", padding_side="left")
    input_ids = processor(images=images(), text=PROMPTS)["input_ids"]

    decoded = processor.batch_decode(input_ids, skip_special_tokens=True)

    assert decoded == PROMPTS
    assert processor.decode(input_ids[1], skip_special_tokens=True) == PROMPTS[1]
    assert processor.post_process_image_text_to_text(input_ids) == decoded
    assert processor.decode(input_ids[1]).startswith("<image>" * NUM_QUERY_TOKENS)


def test_images_and_prompts_of_different_batch_sizes_are_refused():
    processor = stage2_processor("opt")
    with pytest.raises(ValueError, match="got 3 images and 2 texts; expected one text per image"):
        processor(images=images(3), text=PROMPTS[:2])


def test_prompt_longer_than_the_language_model_takes_is_refused_naming_the_lengths():
    processor = stage2_processor("opt")
    processor.tokenizer.model_max_length = 10
    long_prompt = "two dogs run across a green field " * 3
    text_length = len(processor.tokenizer(long_prompt)["input_ids"])
    assert processor.max_text_length == 10

    message = (
        rf"the longest prompt is {NUM_QUERY_TOKENS + text_length} tokens \({NUM_QUERY_TOKENS} image placeholders \+ "
        rf"{text_length} text tokens\); the language model takes at most 10"
    )
    with pytest.raises(ValueError, match=message):
        processor(images=images(2), text=["a cat", long_prompt])
    truncated = processor(images=images(2), text=["a cat", long_prompt], truncation=True, max_length=10)
    assert truncated["input_ids"].shape == (2, 10)
    with pytest.raises(ValueError, match=r"takes at most 8"):
        processor(images=images(1), text=long_prompt, max_length=8)


def test_chat_messages_without_a_chat_template_are_a_clear_error():
    processor = stage2_processor("opt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    with pytest.raises(ValueError, match="has no chat template: BLIP-2 models answer a plain prompt"):
        processor.apply_chat_template(messages)


def test_llm_tokenizer_without_num_query_tokens_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"has no \[CLS\] token.*pass num_query_tokens"):
        Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_llm_tokenizer("opt"))
    with pytest.raises(ValueError, match=r"num_query_tokens is 0; expected a positive integer or None"):
        Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_llm_tokenizer("opt"), num_query_tokens=0)


@pytest.mark.parametrize("max_length", [-1, 3, 4])
def test_max_length_without_room_after_the_placeholders_is_refused_naming_both(max_length):
    from tests.tiny_models import tiny_stage2

    _, processor = tiny_stage2("opt")  # 4 image placeholders
    image = PIL.Image.new("RGB", (28, 28), "red")
    refusal = rf"max_length={max_length} leaves no room .* 4 image placeholders; expected at least 5"
    with pytest.raises(ValueError, match=refusal):
        processor(images=image, text="a photo of", max_length=max_length, truncation=True)
    truncated = processor(images=image, text="a photo of", max_length=5, truncation=True)
    assert truncated["input_ids"].shape == (1, 5)
