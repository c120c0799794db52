"""Collators: exact token ids and label masks by hand, and unreadable samples dropped from their batch and counted."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from modeling_blip2.training.collators import (
    CaptionLMCollator,
    ImageCaptionCollator,
    InstructionCollator,
    VQACollator,
)
from modeling_blip2.training.data import SkippedSamples
from tests.helpers import BOS, EOS, ID, IMAGE, PAD, X, make_bert_tokenizer, make_llm_tokenizer


NUM_QUERY_TOKENS = 3


def image(seed: int = 0, size=(20, 16), mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def image_processor():
    return Blip2BridgeImageProcessor(size={"height": 14, "width": 14})


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split(" ")]


def test_decoder_only_caption_masks_placeholders_bos_prompt_and_padding(image_processor):
    collator = CaptionLMCollator(
        image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS, prompt="a photo of"
    )
    batch = collator([{"image": image(0), "caption": "A Dog runs."}, {"image": image(1), "caption": "CAT"}])

    images = [IMAGE] * NUM_QUERY_TOKENS
    assert batch["input_ids"].tolist() == [
        images + [BOS] + ids("a photo of a dog runs") + [EOS],
        images + [BOS] + ids("a photo of cat") + [EOS, PAD, PAD],
    ]
    assert batch["labels"].tolist() == [
        [X] * 7 + ids("a dog runs") + [EOS],
        [X] * 7 + ids("cat") + [EOS, X, X],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 11, [1] * 9 + [0, 0]]
    assert torch.equal(batch["pixel_values"], image_processor([image(0), image(1)])["pixel_values"])
    assert collator.tokenizer.convert_tokens_to_ids("<image>") == IMAGE


def test_decoder_only_caption_without_prompt_keeps_bos_out_of_the_targets(image_processor):
    collator = CaptionLMCollator(image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS)
    batch = collator([{"image": image(0), "caption": "a cat"}])
    assert batch["input_ids"].tolist() == [[IMAGE] * 3 + [BOS] + ids("a cat") + [EOS]]
    assert batch["labels"].tolist() == [[X] * 4 + ids("a cat") + [EOS]]


def test_end_of_text_and_truncation_keep_the_end_token(image_processor):
    # LAVIS's OPT models end captions with "\n"; max_length counts text tokens, placeholders excluded
    collator = CaptionLMCollator(
        image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS, end_of_text="\n", max_length=4
    )
    batch = collator([{"image": image(0), "caption": "a dog runs"}, {"image": image(1), "caption": "cat"}])
    assert batch["input_ids"].tolist() == [
        [IMAGE] * 3 + [BOS] + ids("a dog") + [ID["\n"]],
        [IMAGE] * 3 + [BOS] + ids("cat") + [ID["\n"], PAD],
    ]
    assert batch["labels"].tolist() == [[X] * 4 + ids("a dog \n"), [X] * 4 + ids("cat \n") + [X]]


def test_a_decoder_only_tokenizer_that_ends_texts_with_eos_itself_gets_one_eos_not_two(image_processor):
    # As Llama's tokenizer with add_eos_token=True: the word-level "t5" tokenizer appends </s> to every text.
    collator = CaptionLMCollator(image_processor, make_llm_tokenizer("t5", vocabulary="words"), NUM_QUERY_TOKENS)
    batch = collator([{"image": image(0), "caption": "a dog runs"}, {"image": image(1), "caption": "a cat"}])
    assert batch["input_ids"].tolist() == [
        [IMAGE] * 3 + ids("a dog runs") + [EOS],
        [IMAGE] * 3 + ids("a cat") + [EOS, PAD],
    ]
    assert batch["labels"].tolist() == [[X] * 3 + ids("a dog runs") + [EOS], [X] * 3 + ids("a cat") + [EOS, X]]


def test_vqa_labels_only_the_answer_and_picks_the_most_frequent_answer(image_processor):
    collator = VQACollator(image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS)
    batch = collator([{"image": image(0), "question": "What is THIS?", "answer": ["red", "yes", "yes", "red", "yes"]}])
    assert batch["input_ids"].tolist() == [[IMAGE] * 3 + [BOS] + ids("Question: what is this? Answer: yes") + [EOS]]
    assert batch["labels"].tolist() == [[X] * 9 + [ID["yes"], EOS]]


def test_encoder_decoder_sends_the_prompt_to_the_encoder_and_the_caption_to_the_labels(image_processor):
    collator = CaptionLMCollator(
        image_processor,
        make_llm_tokenizer("t5", vocabulary="words"),
        NUM_QUERY_TOKENS,
        is_encoder_decoder=True,
        prompt="a photo of",
    )
    batch = collator([{"image": image(0), "caption": "a dog runs"}, {"image": image(1), "caption": "cat"}])
    assert batch["input_ids"].tolist() == [[IMAGE] * 3 + ids("a photo of") + [EOS]] * 2
    assert batch["attention_mask"].tolist() == [[1] * 7] * 2
    assert batch["labels"].tolist() == [ids("a dog runs") + [EOS], ids("cat") + [EOS, X, X]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_encoder_decoder_vqa_and_instructions(image_processor):
    tokenizer = make_llm_tokenizer("t5", vocabulary="words")
    vqa = VQACollator(image_processor, tokenizer, NUM_QUERY_TOKENS, is_encoder_decoder=True)
    batch = vqa([{"image": image(0), "question": "what is this?", "answer": "red"}])
    assert batch["input_ids"].tolist() == [[IMAGE] * 3 + ids("Question: what is this? Answer:") + [EOS]]
    assert batch["labels"].tolist() == [[ID["red"], EOS]]

    instructions = InstructionCollator(image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS)
    batch = instructions([{"image": image(0), "prompt": "describe the image", "response": "a dog runs"}])
    assert batch["input_ids"].tolist() == [[IMAGE] * 3 + [BOS] + ids("describe the image a dog runs") + [EOS]]
    assert batch["labels"].tolist() == [[X] * 7 + ids("a dog runs") + [EOS]]


def test_prefix_lm_splits_captions_at_a_seeded_random_word(image_processor):
    def collate(seed):
        collator = CaptionLMCollator(
            image_processor,
            make_llm_tokenizer("t5", vocabulary="words"),
            NUM_QUERY_TOKENS,
            is_encoder_decoder=True,
            split_captions=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return [collator([{"image": image(0), "caption": "a photo of a dog"}]) for _ in range(40)]

    # the cuts drawn by the same generator: before word 0..4 of the five
    generator = torch.Generator().manual_seed(0)
    cuts = [torch.randint(0, 5, (1,), generator=generator).item() for _ in range(40)]
    words = "a photo of a dog".split(" ")
    for batch, cut in zip(collate(0), cuts):
        assert batch["input_ids"].tolist() == [[IMAGE] * 3 + [ID[word] for word in words[:cut]] + [EOS]]
        assert batch["labels"].tolist() == [[ID[word] for word in words[cut:]] + [EOS]]
    assert sorted(set(cuts)) == [0, 1, 2, 3, 4]
    assert [b["labels"].tolist() for b in collate(0)] == [b["labels"].tolist() for b in collate(0)]
    assert [b["labels"].tolist() for b in collate(0)] != [b["labels"].tolist() for b in collate(1)]


def test_stage1_collator_cleans_captions_and_passes_image_ids(image_processor):
    processor = Blip2BridgeProcessor(image_processor, make_bert_tokenizer())
    collator = ImageCaptionCollator(processor, image_id_column="image_id", max_words=4)
    samples = [
        {"image": image(0), "caption": "A photo of a cat, sitting!", "image_id": 7},
        {"image": image(1), "caption": "Two dogs.", "image_id": 9},
    ]
    batch = collator(samples)
    expected = processor(images=[image(0), image(1)], text=["a photo of a", "two dogs"])
    assert sorted(batch) == ["attention_mask", "image_ids", "input_ids", "pixel_values"]
    for name in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(batch[name], expected[name])
    assert batch["image_ids"].tolist() == [7, 9]


def write_broken_files(folder):
    """Five unreadable samples and four odd-but-valid ones."""
    good = folder / "good.jpg"
    image(0, size=(32, 24)).save(good)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty_file = folder / "empty.png"
    empty_file.write_bytes(b"")
    not_an_image = folder / "text.jpg"
    not_an_image.write_text("not an image")
    sixteen_bit = folder / "sixteen_bit.png"
    PIL.Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16)).save(sixteen_bit)
    cmyk = folder / "cmyk.jpg"
    PIL.Image.new("CMYK", (32, 24), (10, 20, 30, 40)).save(cmyk)
    return [
        {"image": str(good), "caption": "a good image"},
        {"image": str(truncated), "caption": "a truncated jpeg"},
        {"image": str(folder / "missing.jpg"), "caption": "a missing file"},
        {"image": str(empty_file), "caption": "a zero byte file"},
        {"image": str(not_an_image), "caption": "text named jpg"},
        {"image": np.zeros((0, 5, 3), dtype=np.uint8), "caption": "a zero size array"},
        {"image": str(good), "caption": "..."},  # empty once cleaned
        {"image": str(sixteen_bit), "caption": "sixteen bit"},
        {"image": str(cmyk), "caption": "cmyk"},
        {"image": image(2, mode="RGBA"), "caption": "transparent"},
        {"image": image(3, mode="L"), "caption": "grayscale"},
    ]


def test_unreadable_samples_are_dropped_from_the_batch_and_counted(tmp_path, image_processor, caplog):
    samples = write_broken_files(tmp_path)
    processor = Blip2BridgeProcessor(image_processor, make_bert_tokenizer())
    collator = ImageCaptionCollator(processor)
    with caplog.at_level(logging.WARNING):
        batch = collator(samples)

    kept = [samples[index] for index in (0, 7, 8, 9, 10)]
    expected = processor(images=[sample["image"] for sample in kept], text=[s["caption"] for s in kept])
    assert batch["pixel_values"].shape == (5, 3, 14, 14)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])
    assert collator.skipped.counts == {"missing file": 1, "corrupt image": 2, "empty image": 2, "bad text": 1}
    assert (collator.skipped.total, collator.skipped.used) == (6, 5)
    assert collator.skipped.summary() == (
        "6 skipped (1 missing file, 2 corrupt image, 2 empty image, 1 bad text), 5 used"
    )
    warned = caplog.text
    for name in ("truncated.jpg", "missing.jpg", "empty.png", "text.jpg", "batch[5]"):
        assert f"skipped sample {tmp_path / name if name != 'batch[5]' else name}" in warned


def test_stage2_collator_skips_too_and_a_fully_unreadable_batch_repeats_the_last_readable_batch(
    tmp_path, image_processor
):
    samples = write_broken_files(tmp_path)
    skipped = SkippedSamples()
    collator = CaptionLMCollator(
        image_processor, make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS, skipped=skipped
    )
    with pytest.raises(ValueError, match="every sample of the first batch"):
        collator(samples[1:3])
    first = collator([{"image": image(0), "caption": "a dog"}, {"image": image(1), "caption": "a cat"}])
    repeated = collator(samples[1:6])
    # The whole batch: a stage-1 batch of one repeated sample would have no in-batch negative.
    assert torch.equal(repeated["input_ids"], first["input_ids"])
    assert torch.equal(repeated["pixel_values"], first["pixel_values"])
    # first call: truncated + missing; third: truncated, missing, 0-byte file, text file, 0x5 array
    assert skipped.counts == {"missing file": 2, "corrupt image": 3, "empty image": 2, "bad text": 0}
    assert skipped.used == 4


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_stage2_batches_train_the_model_on_exactly_the_labelled_tokens(text):
    from modeling_blip2 import Blip2BridgeForConditionalGeneration
    from tests.tiny_models import NUM_QUERY_TOKENS as MODEL_QUERY_TOKENS, QFORMER_CONFIG, tiny_stage2_config

    is_encoder_decoder = text == "t5"
    tokenizer = make_llm_tokenizer(text, vocabulary="words")
    collator = CaptionLMCollator(
        Blip2BridgeImageProcessor(size={"height": 28, "width": 28}),
        tokenizer,
        MODEL_QUERY_TOKENS,
        is_encoder_decoder=is_encoder_decoder,
        prompt="a photo of",
    )
    batch = collator([{"image": image(0), "caption": "a dog runs"}, {"image": image(1), "caption": "cat"}])
    torch.manual_seed(0)
    # The LLM's vocabulary of 99 holds our 22 word-level tokens.
    config = tiny_stage2_config(text, qformer_config=dict(QFORMER_CONFIG, use_text_input=False), image_token_id=IMAGE)
    model = Blip2BridgeForConditionalGeneration(config).eval()
    with torch.no_grad():
        output = model(**batch)

    vocab_size = model.config.text_config.vocab_size
    if is_encoder_decoder:
        logits, targets = output.logits, batch["labels"]
    else:  # position t predicts token t + 1
        logits, targets = output.logits[:, :-1], batch["labels"][:, 1:]
    assert (targets != -100).sum() == 4 + 2  # "a dog runs </s>" and "cat </s>"
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
    assert abs(output.loss.item() - expected.item()) <= 1e-6


def test_prompt_and_target_join_with_exactly_one_space():
    from modeling_blip2.training.collators import join_prompt

    assert join_prompt("a photo of", "cat") == "a photo of cat"
    assert join_prompt("a photo of ", "cat") == "a photo of cat"  # the prompt's own space is kept, none added
    assert join_prompt("Question: why?\n", "because") == "Question: why?\nbecause"
    assert join_prompt("", "cat") == "cat"


def test_qformer_instructions_need_room_for_cls_and_sep(image_processor):
    tokenizer = make_llm_tokenizer("opt", vocabulary="words")
    with pytest.raises(ValueError, match="qformer_max_length is 1; expected at least 2"):
        InstructionCollator(image_processor, tokenizer, 4, qformer_max_length=1)
    assert InstructionCollator(image_processor, tokenizer, 4, qformer_max_length=2).qformer_max_length == 2


def test_common_prefix_length_stops_at_the_first_difference():
    from modeling_blip2.training.collators import common_prefix_length

    assert common_prefix_length([1, 2, 3, 4], [1, 9, 3, 4]) == 1
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [6]) == 0
