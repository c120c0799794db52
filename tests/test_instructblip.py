"""InstructBLIP and InstructBLIP-Video: transformers' checkpoints load into our stage-2 model with a clean load report
and identical outputs, export back to transformers' classes, and our processor and captioning pipeline give the
prompt to the Q-Former as well, as transformers' InstructBlipProcessor does."""

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    pipeline,
)

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2 import (
    Blip2BridgeConfig,
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeImageProcessor,
    Blip2BridgeProcessor,
)
from modeling_blip2.export_transformers import export_to_instructblip, export_to_transformers, our_name_for
from modeling_blip2.transformers_formats import INSTRUCTBLIP_KEY_MAPPING
from tests.helpers import make_bert_tokenizer, make_llm_tokenizer
from tests.tiny_models import VISION_CONFIG

NUM_QUERY_TOKENS = 4
IMAGE_SIZE = VISION_CONFIG["image_size"]
FRAMES = 3  # not transformers' usual 4: nothing may assume a frame count
INSTRUCTIONS = ["Question: what is in the picture? Answer:", "a photo of", "Describe the image in detail."]
VISION = {name: value for name, value in VISION_CONFIG.items() if name != "model_type"}
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
TEXT_CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "t5": dict(
        model_type="t5",
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        dropout_rate=0.0,
    ),
}
# name -> (LLM, video)
CASES = {"llama": ("llama", False), "t5": ("t5", False), "llama-video": ("llama", True)}
_BUILT = {}


def build_case(name: str, tmp_path_factory) -> SimpleNamespace:
    """transformers' InstructBLIP(-Video) with random (non-trivial) weights and its InstructBlipProcessor, saved in one
    folder, and ours loaded from that folder (with its load report). Built once per module."""
    if name in _BUILT:
        return _BUILT[name]
    text, video = CASES[name]
    # Left padding for the decoder-only LLM's batched generation; T5 pads on the right.
    llm_tokenizer = make_llm_tokenizer(
        "opt" if text == "llama" else "t5", extra_texts=INSTRUCTIONS, padding_side="left" if text == "llama" else "right"
    )
    qformer_tokenizer = make_bert_tokenizer(extra_texts=INSTRUCTIONS)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(image_processor, llm_tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = llm_tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=VISION,
        qformer_config=dict(QFORMER, vocab_size=len(qformer_tokenizer)),
        text_config=dict(TEXT_CONFIGS[text], vocab_size=len(llm_tokenizer)),
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    torch.manual_seed(0)
    if video:
        reference = InstructBlipVideoForConditionalGeneration(
            InstructBlipVideoConfig(**common, video_token_index=image_token_id)
        )
    else:
        reference = InstructBlipForConditionalGeneration(InstructBlipConfig(**common, image_token_index=image_token_id))
    with torch.no_grad():
        for parameter in reference.parameters():  # query tokens start at zero, norms at one: make every weight count
            parameter.add_(0.1 * torch.randn_like(parameter))
    reference.eval()
    folder = tmp_path_factory.mktemp(f"instructblip_{name}")
    reference.save_pretrained(folder)
    processor.save_pretrained(folder)
    ours, loading_info = Blip2BridgeForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    _BUILT[name] = SimpleNamespace(
        name=name,
        text=text,
        video=video,
        reference=reference,
        ours=ours.eval(),
        loading_info=loading_info,
        processor=processor,
        llm_tokenizer=llm_tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        image_token_id=image_token_id,
        folder=folder,
    )
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "t5"])
def image_case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def video_case(tmp_path_factory):
    return build_case("llama-video", tmp_path_factory)


def make_images(count: int = 2) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(count)
    return [PIL.Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)) for _ in range(count)]


def model_inputs(case, instructions=INSTRUCTIONS[:2], frames: int = FRAMES, seed: int = 0) -> dict:
    """Pixels (videos of `frames` frames for a video case), the LLM prompt after `frames * num_query_tokens`
    placeholders, and the same text in Q-Former tokens (the second instruction shorter, so padded)."""
    frames = frames if case.video else 1
    batch_size = len(instructions)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, frames, 3, IMAGE_SIZE, IMAGE_SIZE) if case.video else (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    text = case.llm_tokenizer(instructions, padding="longest", return_tensors="pt")
    placeholders = torch.full((batch_size, frames * NUM_QUERY_TOKENS), case.image_token_id)
    qformer = case.qformer_tokenizer(instructions, padding="longest", return_tensors="pt")
    return dict(
        pixel_values=torch.randn(shape, generator=generator),
        input_ids=torch.cat([placeholders, text["input_ids"]], dim=1),
        attention_mask=torch.cat([torch.ones_like(placeholders), text["attention_mask"]], dim=1),
        qformer_input_ids=qformer["input_ids"],
        qformer_attention_mask=qformer["attention_mask"],
    )


def forward_inputs(case, **kwargs) -> dict:
    """`model_inputs`, with decoder inputs for the encoder-decoder LLM."""
    inputs = model_inputs(case, **kwargs)
    if case.text == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 7]] * inputs["input_ids"].shape[0])
    return inputs


def labels_for(case, inputs: dict) -> dict:
    if case.text == "t5":  # the decoder's targets
        return {"labels": torch.randint(3, 60, (inputs["input_ids"].shape[0], 4), generator=torch.Generator().manual_seed(1))}
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return {"labels": labels.masked_fill(labels == case.image_token_id, -100)}


# ---- loading ------------------------------------------------------------------------------------------------------


def test_transformers_folder_loads_with_a_clean_report_and_every_tensor_in_place(case):
    info = case.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"]
    config = case.ours.config
    assert config.qformer_config.use_text_input is True
    assert config.qformer_config.vocab_size == len(case.qformer_tokenizer)
    assert config.qformer_config.max_position_embeddings == QFORMER["max_position_embeddings"]
    assert config.image_token_id == case.image_token_id  # image_token_index, or video_token_index for a video folder
    assert config.vision_config.model_type == "blip_2_vision_model"

    # Every tensor of theirs is one of ours under INSTRUCTBLIP_KEY_MAPPING, and only the unused norm is left over.
    ours = case.ours.state_dict()
    mapped = set()
    for name, tensor in case.reference.state_dict().items():
        our_name = our_name_for(name, INSTRUCTBLIP_KEY_MAPPING)
        assert torch.equal(ours[our_name], tensor), name
        mapped.add(our_name)
    assert set(ours) - mapped == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
    text_side = [name for name in mapped if ".text_feed_forward." in name or name.startswith("qformer.word_embeddings")]
    assert len(text_side) == 1 + 6 * QFORMER["num_hidden_layers"]


def test_logits_and_loss_equal_transformers(case):
    inputs = model_inputs(case)
    with torch.no_grad():
        expected = case.reference(**inputs, **labels_for(case, inputs))
        actual = case.ours(**inputs, **labels_for(case, inputs))
    assert expected.logits.abs().max() > 0.5  # a random model whose logits differ visibly
    assert (actual.logits - expected.logits).abs().max() <= 1e-4
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5


def test_greedy_tokens_equal_transformers(case):
    inputs = model_inputs(case)
    expected = case.reference.generate(**inputs, do_sample=False, max_new_tokens=5)
    actual = case.ours.generate(**inputs, do_sample=False, max_new_tokens=5)
    assert actual.tolist() == expected.tolist()


def test_another_instruction_changes_the_logits_as_in_transformers(case):
    inputs = forward_inputs(case)
    other = case.qformer_tokenizer(INSTRUCTIONS[1:3], padding="longest", return_tensors="pt")  # Q-Former text only
    changed = dict(inputs, qformer_input_ids=other["input_ids"], qformer_attention_mask=other["attention_mask"])
    with torch.no_grad():
        before = case.ours(**inputs).logits
        after = case.ours(**changed).logits
        expected = case.reference(**changed).logits
    assert (after - before).abs().max() > 1e-3
    assert (after - expected).abs().max() <= 1e-4


def test_auto_class_keeps_transformers_folders_for_transformers_and_ours_for_ours(case, tmp_path):
    """Our registration claims model_type "blip2_bridge" only: transformers' InstructBLIP folders stay transformers'
    (load them into ours with Blip2BridgeForConditionalGeneration.from_pretrained); resaved by us, they are ours."""
    theirs = AutoModelForImageTextToText.from_pretrained(case.folder)
    assert type(theirs) is type(case.reference)
    case.ours.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is Blip2BridgeForConditionalGeneration
    inputs = forward_inputs(case)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, case.ours(**inputs).logits)


# ---- video --------------------------------------------------------------------------------------------------------


def test_video_frames_are_images_that_each_read_their_sample_instruction(video_case):
    ours = video_case.ours
    inputs = model_inputs(video_case)
    pixel_values, qformer_ids, qformer_mask = (inputs[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"))
    with torch.no_grad():
        features = ours.get_image_features(
            pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask
        ).pooler_output
        assert features.shape == (2, FRAMES * NUM_QUERY_TOKENS, TEXT_CONFIGS["llama"]["hidden_size"])
        for sample in range(2):
            for frame in range(FRAMES):
                alone = ours.get_image_features(
                    pixel_values[sample, frame][None],
                    qformer_input_ids=qformer_ids[sample : sample + 1],
                    qformer_attention_mask=qformer_mask[sample : sample + 1],
                ).pooler_output[0]
                rows = features[sample, frame * NUM_QUERY_TOKENS : (frame + 1) * NUM_QUERY_TOKENS]
                torch.testing.assert_close(rows, alone, rtol=0, atol=1e-5)
        # The frames' features after the vision LayerNorm, (batch, frames, length, width), give the same.
        embeds = ours.get_image_embeds(pixel_values.flatten(0, 1)).unflatten(0, (2, FRAMES))
        from_embeds = ours.get_image_features(
            image_embeds=embeds, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask
        ).pooler_output
        assert torch.equal(from_embeds, features)
        # Features computed once answer as the pixels do.
        from_features = ours(image_features=features, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        assert torch.equal(from_features.logits, ours(**inputs).logits)

    one_frame_of_placeholders = dict(inputs, input_ids=inputs["input_ids"][:, (FRAMES - 1) * NUM_QUERY_TOKENS :])
    with pytest.raises(ValueError, match=f"expected {FRAMES * NUM_QUERY_TOKENS} in every row.*{FRAMES} frames"):
        ours(**one_frame_of_placeholders)
    with pytest.raises(ValueError, match="one instruction per video"):
        ours.get_image_features(pixel_values, qformer_input_ids=qformer_ids[:1])
    # A video of one frame is one image's worth of queries; a video without frames is refused.
    with torch.no_grad():
        one_frame = ours.get_image_features(
            pixel_values[:1, :1], qformer_input_ids=qformer_ids[:1], qformer_attention_mask=qformer_mask[:1]
        ).pooler_output
    torch.testing.assert_close(one_frame[0], features[0, :NUM_QUERY_TOKENS], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected at least one video of one frame"):
        ours.get_image_features(pixel_values[:, :0])


def test_video_captioning_without_a_prompt_equals_transformers(video_case):
    """transformers' InstructBLIP-Video captions from 4 frames' placeholders + BOS: ours from as many as the video has."""
    inputs = model_inputs(video_case, frames=4)
    qformer = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
    expected = video_case.reference.generate(pixel_values=inputs["pixel_values"], **qformer, max_new_tokens=5)
    actual = video_case.ours.generate(pixel_values=inputs["pixel_values"], **qformer, max_new_tokens=5)
    assert actual.tolist() == expected.tolist()
    assert actual[:, : 4 * NUM_QUERY_TOKENS].eq(video_case.image_token_id).all()


# ---- export -------------------------------------------------------------------------------------------------------


def test_export_round_trip_loads_in_transformers_with_equal_logits_and_tokens(case, tmp_path):
    exported = export_to_instructblip(case.ours, tmp_path, tokenizer=case.llm_tokenizer, video=case.video)
    reloaded = type(case.reference).from_pretrained(tmp_path).eval()
    assert type(exported) is type(case.reference)
    token_name = "video_token_index" if case.video else "image_token_index"
    assert getattr(reloaded.config, token_name) == case.image_token_id
    inputs = forward_inputs(case)
    with torch.no_grad():
        expected = case.ours(**inputs).logits
        actual = reloaded(**inputs).logits
    assert (actual - expected).abs().max() <= 1e-4
    greedy = dict(do_sample=False, max_new_tokens=5)
    inputs = model_inputs(case)
    assert reloaded.generate(**inputs, **greedy).tolist() == case.ours.generate(**inputs, **greedy).tolist()
    for name, tensor in case.reference.state_dict().items():  # the folder it came from, tensor for tensor
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_export_to_transformers_exports_an_instruction_aware_model_as_instructblip(image_case, tmp_path):
    exported = export_to_transformers(image_case.ours, tmp_path)
    assert type(exported) is InstructBlipForConditionalGeneration
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "instructblip"


def tiny_instruction_aware_model(**overrides) -> Blip2BridgeForConditionalGeneration:
    config = Blip2BridgeConfig(
        vision_config=VISION_CONFIG,
        qformer_config=dict(QFORMER, vocab_size=50, use_text_input=True),
        text_config=dict(TEXT_CONFIGS["llama"], vocab_size=99),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_id=98,
        vision_layer_norm_eps=1e-6,  # transformers' post_layernorm takes the vision layers' eps
        **overrides,
    )
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("vision_feature_layer", [-1, -2])
def test_a_model_built_here_exports_as_instructblip_with_equal_logits(vision_feature_layer, tmp_path):
    ours = tiny_instruction_aware_model(vision_feature_layer=vision_feature_layer)
    export_to_instructblip(ours, tmp_path)
    theirs = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        input_ids=torch.cat([torch.full((2, NUM_QUERY_TOKENS), 98), torch.randint(3, 98, (2, 5), generator=generator)], 1),
        qformer_input_ids=torch.randint(1, 50, (2, 6), generator=generator),
    )
    with torch.no_grad():
        expected = ours(**inputs).logits
        actual = theirs(**inputs).logits
    assert expected.abs().max() > 0.5
    assert (actual - expected).abs().max() <= 1e-4


def test_a_model_whose_qformer_reads_no_text_is_refused_by_the_instructblip_export(tmp_path):
    from tests.tiny_models import tiny_stage2_config

    blip2 = Blip2BridgeForConditionalGeneration(tiny_stage2_config("opt"))
    with pytest.raises(ValueError, match="use_text_input=False"):
        export_to_instructblip(blip2, tmp_path)


# ---- processor ----------------------------------------------------------------------------------------------------


def test_processor_reads_an_instructblip_processor_folder_and_tokenizes_as_it_does(image_case):
    ours = Blip2BridgeProcessor.from_pretrained(image_case.folder)
    theirs = image_case.processor
    assert ours.is_instruction_aware and ours.num_query_tokens == NUM_QUERY_TOKENS
    assert ours.qformer_tokenizer.get_vocab() == image_case.qformer_tokenizer.get_vocab()
    images, prompts = make_images(3), INSTRUCTIONS
    actual = ours(images=images, text=prompts)
    expected = theirs(images=images, text=prompts, padding="longest", return_tensors="pt")
    assert sorted(actual) == sorted(expected)
    for name in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(actual[name], expected[name]), name
    # The Q-Former's tokens: the same per row; padded on the Q-Former tokenizer's side (right), where transformers
    # takes the LLM tokenizer's (left for the decoder-only LLM here).
    mask = actual["qformer_attention_mask"]
    for row in range(len(prompts)):
        kept = actual["qformer_input_ids"][row][mask[row] == 1]
        assert kept.tolist() == expected["qformer_input_ids"][row][expected["qformer_attention_mask"][row] == 1].tolist()
    assert torch.equal(mask, mask.sort(dim=1, descending=True).values)  # right padding
    if image_case.llm_tokenizer.padding_side == "right":
        assert torch.equal(actual["qformer_input_ids"], expected["qformer_input_ids"])


def test_processor_outputs_drive_our_model_as_transformers_processor_drives_theirs(image_case):
    ours_processor = Blip2BridgeProcessor.from_pretrained(image_case.folder)
    images = make_images(2)
    # One prompt for both: no padding, so transformers' left-padded Q-Former tokens equal ours.
    ours_inputs = ours_processor(images=images, text=INSTRUCTIONS[0])
    their_inputs = image_case.processor(images=images, text=[INSTRUCTIONS[0]] * 2, return_tensors="pt")
    greedy = dict(do_sample=False, max_new_tokens=5)
    expected = image_case.reference.generate(**their_inputs, **greedy)
    assert image_case.ours.generate(**ours_inputs, **greedy).tolist() == expected.tolist()


def test_processor_round_trip_keeps_the_qformer_tokenizer(image_case, tmp_path):
    processor = Blip2BridgeProcessor(
        Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        image_case.llm_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
        qformer_tokenizer=image_case.qformer_tokenizer,
    )
    expected = processor(images=make_images(2), text=INSTRUCTIONS[:2])
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    assert "qformer_tokenizer" not in json.loads((tmp_path / "processor_config.json").read_text())
    for loaded in (Blip2BridgeProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Blip2BridgeProcessor and loaded.is_instruction_aware
        actual = loaded(images=make_images(2), text=INSTRUCTIONS[:2])
        assert sorted(actual) == sorted(expected)
        for name in expected:
            assert torch.equal(actual[name], expected[name]), name
    # Text alone: the Q-Former's tokens too, and no placeholders (as transformers' InstructBlipProcessor).
    text_only = processor(text=INSTRUCTIONS[0])
    assert text_only["qformer_input_ids"].tolist() == [image_case.qformer_tokenizer(INSTRUCTIONS[0])["input_ids"]]
    assert not (text_only["input_ids"] == processor.image_token_id).any()


def test_processor_push_to_hub_uploads_the_qformer_tokenizer(image_case, local_hub, tmp_path):
    processor = Blip2BridgeProcessor(
        Blip2BridgeImageProcessor(), image_case.llm_tokenizer, num_query_tokens=NUM_QUERY_TOKENS,
        qformer_tokenizer=image_case.qformer_tokenizer,
    )
    processor.push_to_hub("user/instructblip")
    processor.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="user/saved-and-pushed")
    for repo_id in ("user/instructblip", "user/saved-and-pushed"):
        uploaded = {path for repo, _, paths in local_hub.commits if repo == repo_id for path in paths}
        assert {"processor_config.json", "qformer_tokenizer/tokenizer_config.json"} <= uploaded
        loaded = Blip2BridgeProcessor.from_pretrained(local_hub.root / repo_id)
        assert loaded.qformer_tokenizer.get_vocab() == image_case.qformer_tokenizer.get_vocab()


def test_processor_without_a_qformer_tokenizer_returns_no_qformer_inputs_and_stage1_refuses_one(image_case, tmp_path):
    plain = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), image_case.llm_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    assert not plain.is_instruction_aware
    assert "qformer_input_ids" not in plain(images=make_images(1), text="a photo of")
    plain.save_pretrained(tmp_path)
    assert not Blip2BridgeProcessor.from_pretrained(tmp_path).is_instruction_aware
    with pytest.raises(ValueError, match="without num_query_tokens"):
        Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_bert_tokenizer(), qformer_tokenizer=make_bert_tokenizer())


# ---- pipeline -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruction_aware_folder(image_case, tmp_path_factory):
    """Our model loaded from transformers' InstructBLIP, saved with our processor (holding the Q-Former's tokenizer)."""
    processor = Blip2BridgeProcessor(
        Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        image_case.llm_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
        qformer_tokenizer=image_case.qformer_tokenizer,
    )
    folder = tmp_path_factory.mktemp(f"ours_{image_case.name}")
    image_case.ours.save_pretrained(folder)
    processor.save_pretrained(folder)
    return image_case, processor, str(folder)


def new_text(case, processor, images, prompt: str, **generate_kwargs) -> list[str]:
    """What the model generates after the prompt, with the prompt's Q-Former tokens, decoded by the processor."""
    inputs = processor(images=images, text=prompt)
    assert "qformer_input_ids" in inputs
    generated = case.ours.generate(**inputs, **generate_kwargs)
    if case.text == "llama":  # a decoder-only LLM returns the prompt first
        generated = generated[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(generated, skip_special_tokens=True)


def test_captioning_pipeline_gives_the_prompt_to_the_qformer_too(instruction_aware_folder):
    case, processor, folder = instruction_aware_folder
    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
    assert captioner.processor.is_instruction_aware
    images = make_images(2)
    prompt = INSTRUCTIONS[0]
    preprocessed = captioner.preprocess({"images": images[0], "text": prompt})
    assert preprocessed["qformer_input_ids"].tolist() == [case.qformer_tokenizer(prompt)["input_ids"]]

    answers = captioner(images, prompt=prompt, max_new_tokens=5, return_full_text=False)
    expected = new_text(case, processor, images, prompt, max_new_tokens=5)
    assert answers == [[{"generated_text": text}] for text in expected]
    captions = captioner(images[0], max_new_tokens=5)  # no prompt: the Q-Former reads [CLS] [SEP]
    assert captions == [{"generated_text": new_text(case, processor, images[:1], "", max_new_tokens=5)[0]}]


def test_captioner_warns_when_an_instruction_aware_model_comes_without_a_qformer_tokenizer(image_case):
    from transformers.testing_utils import CaptureLogger

    from modeling_blip2 import Blip2BridgeImageToTextPipeline
    from modeling_blip2.pipeline_image_to_text import logger

    plain = Blip2BridgeProcessor(
        Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        image_case.llm_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    with CaptureLogger(logger) as captured:
        Blip2BridgeImageToTextPipeline(model=image_case.ours, processor=plain)
    assert "no Q-Former tokenizer" in captured.out


def test_image_text_to_text_pipeline_answers_with_the_instruction_as_generate_does(instruction_aware_folder):
    case, processor, folder = instruction_aware_folder
    pipe = pipeline("image-text-to-text", model=folder)
    images = make_images(2)
    outputs = pipe(images=images, text=INSTRUCTIONS[:2], max_new_tokens=5, return_full_text=False)
    expected = new_text(case, processor, images, INSTRUCTIONS[:2], max_new_tokens=5)
    assert [output["generated_text"] for output in outputs] == expected
