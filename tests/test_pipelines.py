"""Pipelines on a saved stage-2 folder: "image-text-to-text" answers prompts, "image-to-text" captions without one.
Every returned text equals the processor's decoding of the model's own `generate` on the same inputs."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2 import Blip2BridgeImageToTextPipeline
from tests.tiny_models import tiny_stage2

PROMPTS = ["Question: what is in the picture? Answer:", "a photo of"]


def make_images(count: int = 2) -> list[PIL.Image.Image]:
    return [
        PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 26, 3), dtype=np.uint8))
        for seed in range(count)
    ]


@pytest.fixture(scope="module", params=["opt", "t5"])
def saved(request, tmp_path_factory):
    """(kind, model, processor, folder) with model and processor saved in the folder."""
    model, processor = tiny_stage2(request.param)
    folder = tmp_path_factory.mktemp(f"stage2_{request.param}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return request.param, model, processor, str(folder)


def new_text(kind, model, processor, images, prompts, **generate_kwargs) -> list[str]:
    """What the model itself generates after the prompt, decoded by the processor."""
    inputs = processor(images=images, text=prompts)
    generated = model.generate(**inputs, **generate_kwargs)
    if kind == "opt":  # a decoder-only LLM returns the prompt first
        generated = generated[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(generated, skip_special_tokens=True)


def test_image_text_to_text_answers_each_prompt_as_generate_does(saved):
    kind, model, processor, folder = saved
    pipe = pipeline("image-text-to-text", model=folder)
    images = make_images()

    outputs = pipe(images=images, text=PROMPTS, max_new_tokens=6, return_full_text=False)

    expected = new_text(kind, model, processor, images, PROMPTS, max_new_tokens=6)
    assert [output["generated_text"] for output in outputs] == expected
    assert [output["input_text"] for output in outputs] == PROMPTS
    assert all(answer for answer in expected)  # the random model does say something
    full = pipe(images=images, text=PROMPTS, max_new_tokens=6)  # full text: the prompt, then the answer
    assert [output["generated_text"] for output in full] == [p + a for p, a in zip(PROMPTS, expected)]


def test_image_text_to_text_returns_what_transformers_blip2_pipeline_returns_on_the_same_weights(saved, tmp_path):
    """The joint of prompt and answer is the model's: "a photo of" + "a ..." reads "a photo ofa ..." for a model that
    was trained to caption without a prompt, in transformers' BLIP-2 as in ours."""
    from transformers import Blip2Processor, BlipImageProcessor

    from modeling_blip2.export_transformers import export_to_transformers

    kind, model, processor, folder = saved
    export_to_transformers(model, tmp_path, tokenizer=processor.tokenizer)
    size = processor.image_processor.size
    image_processor = BlipImageProcessor(size={"height": size["height"], "width": size["width"]})
    Blip2Processor(image_processor, processor.tokenizer, num_query_tokens=model.config.num_query_tokens).save_pretrained(
        tmp_path
    )
    ours, theirs = pipeline("image-text-to-text", model=folder), pipeline("image-text-to-text", model=str(tmp_path))
    images = make_images()
    for prompts in (PROMPTS, ["a photo of", "a photo of "], ["", ""]):
        for return_full_text in (True, False):
            options = dict(max_new_tokens=6, return_full_text=return_full_text)
            assert ours(images=images, text=prompts, **options) == theirs(images=images, text=prompts, **options)


def test_image_text_to_text_with_an_empty_prompt_captions_like_generate_without_input_ids(saved):
    kind, model, processor, folder = saved
    pipe = pipeline("image-text-to-text", model=folder)
    image = make_images(1)[0]

    output = pipe(images=image, text="", max_new_tokens=6)

    pixel_values = processor(images=image)["pixel_values"]
    caption = processor.batch_decode(model.generate(pixel_values=pixel_values, max_new_tokens=6), skip_special_tokens=True)
    assert [record["generated_text"] for record in output] == caption


def test_image_to_text_captions_without_a_prompt(saved):
    kind, model, processor, folder = saved
    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
    assert type(captioner).__name__ == "Blip2BridgeImageToTextPipeline"
    images = make_images(3)

    one = captioner(images[0], max_new_tokens=6)
    many = captioner(images, max_new_tokens=6)
    prompted = captioner(images[0], prompt="a photo of", max_new_tokens=6, return_full_text=False)

    captions = new_text(kind, model, processor, images, "", max_new_tokens=6)
    assert one == [{"generated_text": captions[0]}]
    assert many == [[{"generated_text": caption}] for caption in captions]
    assert len(set(captions)) > 1  # different images, different captions
    assert prompted == [{"generated_text": new_text(kind, model, processor, images[:1], "a photo of", max_new_tokens=6)[0]}]


def test_image_to_text_generates_at_most_30_new_tokens_by_default(saved):
    kind, model, processor, folder = saved
    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
    image = make_images(1)[0]

    expected = new_text(kind, model, processor, [image], "", max_new_tokens=30)
    assert captioner(image) == [{"generated_text": expected[0]}]


def test_installed_plugin_reaches_the_captioner_through_pipeline_class(saved):
    kind, model, processor, folder = saved
    captioner = pipeline("image-to-text", model=folder, pipeline_class=Blip2BridgeImageToTextPipeline)
    image = make_images(1)[0]
    assert type(captioner) is Blip2BridgeImageToTextPipeline
    assert type(captioner.model) is type(model)
    assert captioner(image, max_new_tokens=4) == [
        {"generated_text": new_text(kind, model, processor, [image], "", max_new_tokens=4)[0]}
    ]
    # From a model in memory too.
    in_memory = Blip2BridgeImageToTextPipeline(model=model, processor=processor)
    assert in_memory(image, max_new_tokens=4) == captioner(image, max_new_tokens=4)


def test_image_to_text_from_a_folder_needs_trust_remote_code_or_the_class():
    model, processor = tiny_stage2("opt")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            pipeline("image-to-text", model=folder)


def test_processor_and_model_with_different_image_tokens_are_refused():
    model, processor = tiny_stage2("opt")
    model.config.image_token_id = processor.image_token_id - 1
    with pytest.raises(ValueError, match=rf"image token has id {processor.image_token_id} but the model's config"):
        Blip2BridgeImageToTextPipeline(model=model, processor=processor)


def test_chat_messages_without_a_chat_template_are_a_clear_error(saved):
    _, _, _, folder = saved
    pipe = pipeline("image-text-to-text", model=folder)
    image = make_images(1)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ValueError, match="has no chat template: BLIP-2 models answer a plain prompt"):
        pipe(text=messages, max_new_tokens=2)
