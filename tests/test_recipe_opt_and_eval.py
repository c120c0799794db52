"""Recipe fidelity: OPT text ends with "\\n" (training targets and generation stop), and the evaluation's prompts and
decoding per task and LLM family follow LAVIS's released eval configs (the paper's text one flag away)."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LlamaConfig, OPTConfig, T5Config

from modeling_blip2 import Blip2BridgeImageProcessor
from modeling_blip2.evaluation import runner
from modeling_blip2.processing.end_of_text import default_end_of_text
from modeling_blip2.training.collators import CaptionLMCollator, VQACollator
from tests.helpers import make_llm_tokenizer
from tests.tiny_models import tiny_stage2


NUM_QUERY_TOKENS = 4
TEXT_CONFIGS = {"opt": OPTConfig(), "t5": T5Config(), "llama": LlamaConfig()}


@pytest.fixture(scope="module")
def opt_tokenizer():
    return make_llm_tokenizer("opt")


def newline_id(tokenizer) -> int:
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] != tokenizer.eos_token_id
    return ids[0]


def image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))


# ---- training targets -------------------------------------------------------------------------------------------


def test_the_end_of_text_is_newline_for_opt_and_the_eos_for_other_families():
    assert [default_end_of_text(TEXT_CONFIGS[kind]) for kind in ("opt", "t5", "llama")] == ["\n", None, None]


def test_opt_caption_tokens_are_lavis_caption_plus_newline_and_labels_end_with_its_id(opt_tokenizer):
    """Blip2OPT.forward tokenizes `prompt + caption + "\\n"`; the labels cover the caption and the "\\n"."""
    image_processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    collator = CaptionLMCollator(image_processor, opt_tokenizer, NUM_QUERY_TOKENS, prompt="a photo of",
                                 end_of_text=default_end_of_text(TEXT_CONFIGS["opt"]))
    caption = "a cat sitting on a red sofa"
    batch = collator([{"image": image(0), "caption": caption}])
    lavis_ids = opt_tokenizer("a photo of " + caption + "\n")["input_ids"]
    prompt_length = len(opt_tokenizer("a photo of")["input_ids"])
    assert batch["input_ids"][0, NUM_QUERY_TOKENS:].tolist() == lavis_ids
    assert batch["labels"][0].tolist() == [-100] * (NUM_QUERY_TOKENS + prompt_length) + lavis_ids[prompt_length:]
    assert batch["labels"][0, -1].item() == newline_id(opt_tokenizer) == 202
    assert opt_tokenizer.eos_token_id not in batch["labels"][0].tolist()


def test_t5_answer_labels_still_end_with_its_eos():
    tokenizer = make_llm_tokenizer("t5")
    image_processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    collator = VQACollator(image_processor, tokenizer, NUM_QUERY_TOKENS, is_encoder_decoder=True,
                           prompt="Question: {} Short answer:", end_of_text=default_end_of_text(TEXT_CONFIGS["t5"]))
    batch = collator([{"image": image(0), "question": "what is in the picture?", "answer": "a cat"}])
    assert batch["labels"][0].tolist() == tokenizer("a cat")["input_ids"]
    assert batch["labels"][0, -1].item() == tokenizer.eos_token_id == 1


# ---- evaluation settings ------------------------------------------------------------------------------------------

SHORT = "Question: {} Short answer:"
LAVIS_DEFAULTS = [
    # task, family, prompt, num_beams, max_new_tokens, min_new_tokens, length penalty, repetition penalty, stops at "\n"
    ("vqav2", "opt", SHORT, 5, 10, 1, 0.0, 1.0, True),  # vqav2_zeroshot_opt_eval.yaml; Blip2OPT.predict_answers lp 0
    ("okvqa", "t5", SHORT, 5, 10, 0, -1.0, 1.0, False),  # okvqa_zeroshot_flant5xl_eval.yaml; T5 min_len counts start
    ("gqa", "t5", SHORT, 5, 10, 0, -1.0, 1.0, False),  # gqa_zeroshot_flant5xl_eval.yaml
    ("vqav2", "llama", "Question: {} Answer:", 5, 10, 1, -1.0, 1.0, False),  # no LAVIS config: the paper
    ("coco_caption", "opt", "a photo of", 5, 30, 8, 1.0, 1.0, True),  # caption_coco_opt2.7b_eval.yaml
    ("coco_caption", "t5", "", 5, 30, 7, 1.0, 1.0, False),  # caption_coco_flant5xl_eval.yaml (pretrain_flant5xl)
    ("nocaps", "t5", "", 5, 80, 9, 1.0, 1.15, False),  # caption_nocaps_out_domain_flant5xl_eval.yaml, captioning.py
    ("nocaps", "opt", "a photo of", 5, 80, 10, 1.0, 1.0, True),  # no LAVIS config: the paper's prompt, NoCaps lengths
]


@pytest.mark.parametrize(
    "task, family, prompt, beams, max_new, min_new, length_penalty, repetition_penalty, stops_at_newline",
    LAVIS_DEFAULTS,
)
def test_generate_kwargs_per_task_and_family_follow_lavis_released_configs(
    opt_tokenizer, task, family, prompt, beams, max_new, min_new, length_penalty, repetition_penalty, stops_at_newline
):
    settings = runner.generation_settings(task, TEXT_CONFIGS[family])
    assert settings.prompt == prompt
    expected = dict(num_beams=beams, max_new_tokens=max_new, min_new_tokens=min_new, length_penalty=length_penalty,
                    repetition_penalty=repetition_penalty)
    if stops_at_newline:
        expected["eos_token_id"] = newline_id(opt_tokenizer)
    assert runner.generate_kwargs(settings, opt_tokenizer) == expected


@pytest.mark.parametrize("task, family, prompt, length_penalty", [
    ("vqav2", "opt", "Question: {} Answer:", -1.0),
    ("gqa", "t5", SHORT, -1.0),
    ("coco_caption", "t5", "a photo of", 1.0),
    ("nocaps", "t5", "a photo of", 1.0),
])
def test_paper_defaults_change_only_what_the_paper_says(task, family, prompt, length_penalty):
    lavis = runner.generation_settings(task, TEXT_CONFIGS[family])
    paper = runner.generation_settings(task, TEXT_CONFIGS[family], defaults="paper")
    assert (paper.prompt, paper.length_penalty) == (prompt, length_penalty)
    unchanged = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "end_of_text")
    assert [getattr(paper, name) for name in unchanged] == [getattr(lavis, name) for name in unchanged]


def test_overrides_replace_defaults_and_an_empty_end_of_text_means_the_eos(opt_tokenizer):
    settings = runner.generation_settings("vqav2", TEXT_CONFIGS["opt"], overrides={"end_of_text": "", "num_beams": 3})
    assert (settings.end_of_text, settings.num_beams) == (None, 3)
    assert "eos_token_id" not in runner.generate_kwargs(settings, opt_tokenizer)
    with pytest.raises(ValueError, match="defaults is 'lavis2'"):
        runner.generation_settings("vqav2", TEXT_CONFIGS["opt"], defaults="lavis2")


def test_an_end_of_text_of_several_tokens_is_refused(opt_tokenizer):
    settings = runner.generation_settings("vqav2", TEXT_CONFIGS["opt"], overrides={"end_of_text": "sofa\n"})
    with pytest.raises(ValueError, match=r"end_of_text 'sofa\\n' is \d tokens"):
        runner.generate_kwargs(settings, opt_tokenizer)


# ---- generation on tiny models ------------------------------------------------------------------------------------


def test_opt_generation_stops_at_the_newline_token():
    """With "\\n" made the likeliest token, LAVIS's stop ends the caption right after min_new_tokens; the LLM's own
    EOS (the old behaviour) lets it run with "\\n" to max_new_tokens."""
    model, processor = tiny_stage2("opt")
    settings = runner.generation_settings("coco_caption", model.config.text_config)
    assert (settings.min_new_tokens, settings.max_new_tokens) == (8, 30)
    settings = runner.generation_settings("coco_caption", model.config.text_config, overrides={"max_new_tokens": 12})
    newline = newline_id(processor.tokenizer)
    inputs = processor(images=[image(1), image(2)], text=[settings.prompt] * 2, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    likely_newline = {(newline,): 100.0}

    stopped = model.generate(**inputs, **runner.generate_kwargs(settings, processor.tokenizer),
                             sequence_bias=likely_newline)[:, prompt_length:]
    assert stopped.shape[1] == settings.min_new_tokens + 1 == 9
    assert stopped[:, -1].tolist() == [newline, newline]
    assert (stopped[:, :-1] != newline).all()

    eos_stop = runner.generation_settings("coco_caption", model.config.text_config,
                                          overrides={"max_new_tokens": 12, "end_of_text": ""})
    unstopped = model.generate(**inputs, **runner.generate_kwargs(eos_stop, processor.tokenizer),
                               sequence_bias=likely_newline)[:, prompt_length:]
    assert unstopped.shape[1] == 12
    assert (unstopped == newline).all()


def test_t5_min_new_tokens_equal_lavis_min_length_which_counts_the_decoder_start():
    """Blip2T5.generate passes min_length=8 (caption_coco_flant5xl_eval.yaml): 7 new tokens, then EOS may come."""
    model, processor = tiny_stage2("t5")
    settings = runner.generation_settings("coco_caption", model.config.text_config)
    eos = processor.tokenizer.eos_token_id
    inputs = processor(images=[image(1), image(2)], text=[settings.prompt] * 2, return_tensors="pt")
    likely_eos = {(eos,): 100.0}
    ours = model.generate(**inputs, **runner.generate_kwargs(settings, processor.tokenizer), sequence_bias=likely_eos)
    lavis = model.generate(**inputs, num_beams=5, max_new_tokens=30, min_length=8, length_penalty=1.0,
                           sequence_bias=likely_eos)
    assert torch.equal(ours, lavis)
    assert ours.shape[1] == 1 + 7 + 1  # decoder start, 7 tokens, EOS
    assert ours[:, -1].tolist() == [eos, eos]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_train_command_ends_opt_captions_with_newline_and_others_with_eos(kind):
    from modeling_blip2.training.cli_train import make_collator, parse_arguments

    model, processor = tiny_stage2(kind)
    model_args, data_args, _ = parse_arguments(["--stage", "2", "--output_dir", "unused", "--image_folder", "unused"])
    collator, _ = make_collator(model_args, data_args, model, processor.tokenizer, processor.image_processor, None)
    expected = [newline_id(processor.tokenizer)] if kind == "opt" else [processor.tokenizer.eos_token_id]
    assert collator.end_of_text_ids == expected
    model_args, data_args, _ = parse_arguments(
        ["--stage", "2", "--output_dir", "unused", "--image_folder", "unused", "--end_of_text", "</s>"]
    )
    collator, _ = make_collator(model_args, data_args, model, processor.tokenizer, processor.image_processor, None)
    assert collator.end_of_text_ids == [processor.tokenizer.convert_tokens_to_ids("</s>")]
