"""The LAVIS converter: tiny random LAVIS checkpoints (EVA and CLIP towers) in, `Blip2BridgeModel` folders out."""

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoTokenizer

from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeModel
from modeling_blip2.cli import main
from modeling_blip2.convert_lavis import (
    convert_lavis_checkpoint,
    convert_lavis_state_dict,
    lavis_config_from_state_dict,
)
from tests.helpers import make_llm_tokenizer
from tests.lavis_checkpoints import (
    CLIP_CONFIG,
    DEC_ID,
    EVA_CONFIG,
    IMAGE,
    LAVIS_PROJECTIONS,
    LAVIS_QFORMER,
    PATCH,
    QFORMER_CONFIG,
    TOWERS,
    VISION_DEPTH,
    VISION_HEADS,
    VISION_WIDTH,
    converted_config,
    eva_tower,
    lavis_checkpoint,
    lavis_stage2_checkpoint,
    lavis_vision_features,
    save_checkpoint,
    tiny_language_model_folder,
    tower_weights,
    write_json,
)
from tests.lavis_reference import LavisBlip2Qformer, lavis_state_dict_random
from tests.lavis_vision_reference import clip_vit_shapes, eva_vit_forward, eva_vit_shapes


# An independent statement of where each LAVIS tensor lands (the converter uses its own tables).
LAVIS_LAYER_MODULES = {
    **{
        f"{block}.{part}.{name}": f"{block}.{name}"
        for block in ("attention", "crossattention")
        for part, names in (("self", ("query", "key", "value")), ("output", ("dense", "LayerNorm")))
        for name in names
    },
    "intermediate.dense": "text_feed_forward.intermediate",
    "output.dense": "text_feed_forward.output",
    "output.LayerNorm": "text_feed_forward.LayerNorm",
    "intermediate_query.dense": "query_feed_forward.intermediate",
    "output_query.dense": "query_feed_forward.output",
    "output_query.LayerNorm": "query_feed_forward.LayerNorm",
}
LAVIS_MODULES = {
    "Qformer.bert.embeddings.word_embeddings": "qformer.word_embeddings",
    "Qformer.bert.embeddings.position_embeddings": "qformer.position_embeddings",
    "Qformer.bert.embeddings.LayerNorm": "qformer.layernorm",
    "Qformer.cls.predictions.transform.dense": "itg_head.dense",
    "Qformer.cls.predictions.transform.LayerNorm": "itg_head.LayerNorm",
    "Qformer.cls.predictions": "itg_head.decoder",  # its `bias`
    "ln_vision": "vision_layernorm",
}


def our_name_for(lavis_key: str) -> str:
    module, _, parameter = lavis_key.rpartition(".")
    layer = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", module)
    if layer:
        return f"qformer.layer.{layer.group(1)}.{LAVIS_LAYER_MODULES[layer.group(2)]}.{parameter}"
    if module in LAVIS_MODULES:
        return f"{LAVIS_MODULES[module]}.{parameter}"
    return lavis_key  # query_tokens, temp, vision_proj, text_proj, itm_head keep their names


def assert_every_lavis_tensor_landed(model, state_dict, tower):
    ours = model.state_dict()
    checked = set()
    for key, value in state_dict.items():
        if key.startswith("visual_encoder.") or key.endswith("position_ids") or ".decoder." in key:
            continue
        name = our_name_for(key)
        # LAVIS's temperature is 0-d; ours holds the same number as a 1-element vector (FSDP refuses 0-d parameters).
        expected = value.reshape(1) if key == "temp" else value
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=0, msg=f"{key} -> {name}")
        checked.add(name)
    # Tied: the ITG decoder is the word-embedding matrix.
    torch.testing.assert_close(ours["itg_head.decoder.weight"], state_dict["Qformer.cls.predictions.decoder.weight"])
    checked.add("itg_head.decoder.weight")

    vision = tower_weights(state_dict)
    layer = "vision_model.encoder.layers.1."
    if tower == "eva":
        expected = {
            "vision_model.embeddings.class_embedding": vision["cls_token"],
            "vision_model.embeddings.position_embedding": vision["pos_embed"],
            layer + "self_attn.qkv.weight": vision["blocks.1.attn.qkv.weight"],
            layer + "self_attn.qkv.bias": torch.cat(
                [vision["blocks.1.attn.q_bias"], torch.zeros(VISION_WIDTH), vision["blocks.1.attn.v_bias"]]
            ),
            layer + "mlp.fc2.weight": vision["blocks.1.mlp.fc2.weight"],
        }
    else:
        q, k, v = vision["transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
        expected = {
            "vision_model.embeddings.class_embedding": vision["class_embedding"],
            "vision_model.pre_layrnorm.weight": vision["ln_pre.weight"],
            layer + "self_attn.q_proj.weight": q,
            layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v,
            layer + "mlp.fc1.weight": vision["transformer.resblocks.1.mlp.c_fc.weight"],
        }
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    # LAVIS's towers have no final norm: it is saved as ones/zeros and never applied to the features.
    assert torch.equal(ours["vision_model.post_layernorm.weight"], torch.ones(VISION_WIDTH))
    assert torch.equal(ours["vision_model.post_layernorm.bias"], torch.zeros(VISION_WIDTH))
    assert not any(name.startswith(f"vision_model.encoder.layers.{VISION_DEPTH}.") for name in ours)
    non_vision = {name for name in ours if not name.startswith("vision_model.")}
    assert non_vision == checked


# ---- conversion through the command line and the function ---------------------------------------------------------


@pytest.mark.parametrize("tower", ["eva", "clip"])
def test_cli_conversion_puts_every_tensor_in_place_and_reproduces_lavis_vision_features(tower, tmp_path, capsys):
    state_dict = lavis_checkpoint(tower)
    checkpoint = save_checkpoint(tmp_path / "blip2_pretrained.pth", state_dict)
    output = tmp_path / "converted"
    exit_code = main(
        [
            "convert",
            "--from",
            "lavis",
            str(checkpoint),
            "--output",
            str(output),
            "--vision",
            write_json(tmp_path / "vision.json", TOWERS[tower][2]),
            "--qformer-config",
            write_json(tmp_path / "qformer.json", QFORMER_CONFIG),
        ]
    )
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert str(output) in printed and "parameters" in printed

    model = AutoModel.from_pretrained(output).eval()
    assert isinstance(model, Blip2BridgeModel)
    assert model.config.vision_feature_layer == -1
    assert model.config.num_query_tokens == LAVIS_QFORMER["num_query_tokens"]
    assert model.config.embed_dim == LAVIS_QFORMER["embed_dim"]
    assert model.config.qformer_config.bos_token_id == DEC_ID
    assert model.config.qformer_config.cross_attention_frequency == 2
    assert_every_lavis_tensor_landed(model, state_dict, tower)

    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.get_image_embeds(pixel_values)
        expected = lavis_vision_features(tower, state_dict, pixel_values)
    assert ours.shape == (2, (IMAGE // PATCH) ** 2 + 1, VISION_WIDTH)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_function_conversion_accepts_a_bare_state_dict_and_a_separate_vision_file(tmp_path):
    # LAVIS's runner saves no frozen parameters, so the tower comes from its own file (eva_vit_g.pth has 40 blocks).
    state_dict = lavis_state_dict_random(LAVIS_QFORMER, seed=0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint_best.pth", state_dict, wrap=False)
    vision_file = save_checkpoint(tmp_path / "eva_vit_g.pth", eva_tower(), wrap=False)
    model = convert_lavis_checkpoint(
        checkpoint, tmp_path / "out", vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG, vision_checkpoint=vision_file
    )
    reloaded = AutoModel.from_pretrained(tmp_path / "out").eval()
    full_state_dict = {**state_dict, **{f"visual_encoder.{k}": v for k, v in eva_tower().items()}}
    assert_every_lavis_tensor_landed(reloaded, full_state_dict, "eva")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_checkpoint_without_vision_weights_asks_for_the_tower_file(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", lavis_state_dict_random(LAVIS_QFORMER, seed=0))
    with pytest.raises(ValueError, match="vision_checkpoint"):
        convert_lavis_checkpoint(checkpoint, tmp_path / "out", vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG)


def test_presets_are_lavis_towers_and_detected_from_the_layout():
    eva = lavis_config_from_state_dict(lavis_checkpoint("eva")).vision_config
    assert (eva.model_type, eva.hidden_size, eva.num_hidden_layers, eva.num_attention_heads) == (
        "blip_2_vision_model", 1408, 39, 16
    )
    assert (eva.intermediate_size, eva.layer_norm_eps, eva.qkv_bias, eva.image_size) == (6144, 1e-6, True, 224)
    clip = lavis_config_from_state_dict(lavis_checkpoint("clip")).vision_config
    assert (clip.model_type, clip.hidden_size, clip.num_hidden_layers, clip.hidden_act) == (
        "clip_vision_model", 1024, 23, "quick_gelu"
    )
    # BERT-base Q-Former by default; the vocabulary and the [DEC] id come from the checkpoint.
    qformer = lavis_config_from_state_dict(lavis_checkpoint("eva")).qformer_config
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.vocab_size, qformer.bos_token_id) == (
        768, 12, 50, 49
    )


@pytest.mark.parametrize(
    "preset, width, tower_shapes, lavis_depth",
    [
        # The released encoder files hold one block more than LAVIS's towers: eva_vit_g.pth 40, clip_vit_L.pth 24.
        ("eva_clip_g", 1408, eva_vit_shapes(1408, 40, 6144, 14, 224), 39),
        ("clip_L", 1024, clip_vit_shapes(1024, 24, 14, 224), 23),
    ],
)
def test_presets_fit_the_full_size_lavis_towers_and_drop_their_last_block(preset, width, tower_shapes, lavis_depth):
    # Full-size towers as shapes only (meta tensors), with a tiny Q-Former reading their width.
    state_dict = lavis_state_dict_random(dict(LAVIS_QFORMER, vision_width=width), seed=0)
    for key, shape in tower_shapes.items():
        state_dict[f"visual_encoder.{key}"] = torch.empty(shape, device="meta")
    config = lavis_config_from_state_dict(state_dict, vision=preset, qformer_config=QFORMER_CONFIG)
    converted = convert_lavis_state_dict(state_dict, config)
    assert config.vision_config.num_hidden_layers == lavis_depth
    assert f"vision_model.encoder.layers.{lavis_depth - 1}.mlp.fc2.weight" in converted
    assert f"vision_model.encoder.layers.{lavis_depth}.mlp.fc2.weight" not in converted
    assert converted["qformer.layer.0.crossattention.key.weight"].shape == (32, width)


# ---- refusals -----------------------------------------------------------------------------------------------------


def test_wrong_shape_is_refused_naming_the_key_and_both_shapes():
    state_dict = lavis_checkpoint("eva")
    key = "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight"
    state_dict[key] = torch.zeros(65, 32)
    config = converted_config(state_dict, "eva")
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape (65, 32)") + ".*expects " + re.escape("(64, 32)")):
        convert_lavis_state_dict(state_dict, config)


def test_wrong_vision_shape_is_refused_through_the_cli(tmp_path, capsys):
    state_dict = lavis_checkpoint("clip")
    key = "visual_encoder.transformer.resblocks.0.attn.in_proj_weight"
    state_dict[key] = torch.zeros(3 * VISION_WIDTH + 3, VISION_WIDTH)
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", state_dict)
    argv = ["convert", "--from", "lavis", str(checkpoint), "--output", str(tmp_path / "out")]
    argv += ["--vision", write_json(tmp_path / "v.json", CLIP_CONFIG)]
    argv += ["--qformer-config", write_json(tmp_path / "q.json", QFORMER_CONFIG)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert f"{key} has shape (75, 24)" in error
    assert "(72, 24)" in error
    assert not (tmp_path / "out").exists()


def test_default_preset_on_a_shallower_tower_says_how_many_blocks_it_holds(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", lavis_checkpoint("eva"))
    assert main(["convert", "--from", "lavis", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    assert "EVA ViT has 3 blocks; the vision config builds 39" in capsys.readouterr().err


def test_unknown_and_missing_tensors_are_refused():
    state_dict = lavis_checkpoint("eva")
    config = converted_config(state_dict, "eva")
    with pytest.raises(ValueError, match="no place in the model.*Qformer.bert.pooler.dense.weight"):
        convert_lavis_state_dict({**state_dict, "Qformer.bert.pooler.dense.weight": torch.zeros(32, 32)}, config)
    del state_dict["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    with pytest.raises(ValueError, match="lacks 1 tensors.*layer.2.crossattention.self.key.weight"):
        convert_lavis_state_dict(state_dict, config)


def test_stage2_checkpoint_without_its_language_model_asks_for_it(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", lavis_stage2_checkpoint("opt"))
    with pytest.raises(ValueError, match="blip2_opt \\(stage-2\\) checkpoint.*pass it as language_model"):
        lavis_config_from_state_dict(lavis_stage2_checkpoint("opt"))
    assert main(["convert", "--from", "lavis", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    assert "--language-model" in capsys.readouterr().err


def test_vision_config_of_the_wrong_tower_is_refused():
    with pytest.raises(ValueError, match="EVA ViT.*'clip_vision_model'"):
        lavis_config_from_state_dict(lavis_checkpoint("eva"), vision="clip_L")


SIDE_EFFECTS = []


def record_unpickling():
    SIDE_EFFECTS.append("code ran")
    return "payload"


class PickledCode:
    """An object whose unpickling would call `record_unpickling`: a stand-in for code hidden in a checkpoint."""

    def __reduce__(self):
        return (record_unpickling, ())


def test_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path):
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": lavis_checkpoint("eva"), "extra": PickledCode()}, checkpoint)
    with pytest.raises(ValueError, match="weights_only"):
        convert_lavis_checkpoint(checkpoint, tmp_path / "out", vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG)
    assert SIDE_EFFECTS == []


# ---- numerics against the original ---------------------------------------------------------------------------------


def converted_and_lavis_models(dtype):
    state_dict = lavis_checkpoint("eva")
    config = converted_config(state_dict, "eva")
    ours = Blip2BridgeModel(config)
    ours.load_state_dict(convert_lavis_state_dict(state_dict, config))
    lavis = LavisBlip2Qformer(LAVIS_QFORMER, state_dict)
    return ours.to(dtype).train(), lavis.to(dtype).train(), state_dict


def text_batch():
    # Batch size 2: each text has one non-positive image (and each image one non-positive text), so both
    # implementations draw the same ITM negatives whatever their random streams.
    input_ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
    return input_ids, (input_ids != 0).long()


def test_converted_model_reproduces_lavis_stage1_losses_from_pixels():
    ours, lavis, state_dict = converted_and_lavis_models(torch.float32)
    input_ids, attention_mask = text_batch()
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    tower = tower_weights(state_dict)
    image_embeds_raw = eva_vit_forward(tower, pixel_values, num_heads=VISION_HEADS, depth=VISION_DEPTH)

    expected = lavis(
        image_embeds_raw=image_embeds_raw, input_ids=input_ids, attention_mask=attention_mask, bos_token_id=DEC_ID
    )
    output = ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(output, name), expected[name], rtol=0, atol=1e-4, msg=name)


def test_converted_model_reproduces_lavis_gradients():
    # float64: vision_proj's gradient is a small difference of large terms, whose float32 rounding alone reaches a
    # relative 5e-4 with LAVIS-like 0.02-std weights.
    ours, lavis, state_dict = converted_and_lavis_models(torch.float64)
    input_ids, attention_mask = text_batch()
    generator = torch.Generator().manual_seed(5)
    image_embeds = torch.randn(2, (IMAGE // PATCH) ** 2 + 1, VISION_WIDTH, dtype=torch.float64, generator=generator)

    expected = lavis(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, bos_token_id=DEC_ID)
    output = ours(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(output, name), expected[name], rtol=0, atol=1e-6, msg=name)
    expected["loss"].backward()
    output.loss.backward()
    lavis_parameters = dict(lavis.named_parameters())
    for name in ("query_tokens", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"):
        ours_grad, lavis_grad = ours.get_parameter(name).grad, lavis_parameters[name].grad
        relative_error = ((ours_grad - lavis_grad).norm() / lavis_grad.norm()).item()
        assert relative_error < 1e-6, f"{name}: relative gradient error {relative_error:.2e}"


def test_converted_model_draws_the_same_hard_negatives_as_the_original_under_one_seed():
    # With six pairs the negatives are random; one vectorised multinomial per direction consumes the random stream
    # exactly as the original's per-row loop, so under the same seed both draw the same pairs.
    ours, lavis, _ = converted_and_lavis_models(torch.float32)
    generator = torch.Generator().manual_seed(6)
    image_embeds = torch.randn(6, (IMAGE // PATCH) ** 2 + 1, VISION_WIDTH, generator=generator)
    input_ids = torch.randint(5, DEC_ID, (6, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 4:], attention_mask[5, 3:] = 0, 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)

    torch.manual_seed(7)
    expected = lavis(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, bos_token_id=DEC_ID)
    torch.manual_seed(8)
    other_draw = ours(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask).itm_logits
    torch.manual_seed(7)
    output = ours(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(output.itm_logits, expected["itm_logits"], rtol=0, atol=1e-6)
    # Another seed draws other pairs, which the comparison above would have caught.
    assert (other_draw - expected["itm_logits"]).abs().max() > 1e-5
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(output, name), expected[name], rtol=0, atol=1e-4, msg=name)
    expected["loss"].backward()
    output.loss.backward()
    lavis_parameters = dict(lavis.named_parameters())
    for name in ("query_tokens", "vision_proj.weight", "text_proj.weight"):
        ours_grad, lavis_grad = ours.get_parameter(name).grad, lavis_parameters[name].grad
        relative_error = ((ours_grad - lavis_grad).norm() / lavis_grad.norm()).item()
        assert relative_error < 1e-3, f"{name}: relative gradient error {relative_error:.2e}"


# ---- stage 2: blip2_opt and blip2_t5 -------------------------------------------------------------------------------

def lavis_stage2_forward(name, llm_folder, stage2_state_dict, pixel_values, prompt, target):
    """LAVIS's Blip2OPT.forward / Blip2T5.forward on the checkpoint, re-stated: the query path through the stage-1
    conversion (checked against LAVIS above), the projection, then the LLM fed [projected queries; text embeddings].
    OPT reads `target` after the queries (no prompt); T5's encoder reads the queries and `prompt`, its decoder `target`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    full = lavis_checkpoint("eva")
    config = converted_config(full, "eva")
    stage1 = Blip2BridgeModel(config)
    stage1.load_state_dict(convert_lavis_state_dict(full, config))
    llm_kwargs = {"dense_act_fn": "gelu"} if name == "t5" else {}  # Blip2T5: t5_config.dense_act_fn = "gelu"
    model_class = AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM
    llm = model_class.from_pretrained(llm_folder, config=AutoConfig.from_pretrained(llm_folder, **llm_kwargs)).eval()
    weight, bias = (stage2_state_dict[f"{LAVIS_PROJECTIONS[name]}.{part}"] for part in ("weight", "bias"))
    with torch.no_grad():
        query_output = stage1.eval().get_query_output(stage1.get_image_embeds(pixel_values)).last_hidden_state
        inputs_llm = F.linear(query_output, weight, bias)
        query_mask = torch.ones(inputs_llm.shape[:2], dtype=torch.long)
        targets = target.input_ids.masked_fill(target.attention_mask == 0, -100)
        text = prompt if name == "t5" else target
        inputs_embeds = torch.cat([inputs_llm, llm.get_input_embeddings()(text.input_ids)], dim=1)
        attention_mask = torch.cat([query_mask, text.attention_mask], dim=1)
        if name == "t5":
            return llm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_attention_mask=target.attention_mask,
                labels=targets,
            )
        labels = torch.cat([torch.full_like(query_mask, -100), targets], dim=1)
        return llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_cli_converts_a_lavis_stage2_checkpoint_with_its_language_model_and_reproduces_the_original(
    name, tmp_path, capsys
):
    llm_folder = tiny_language_model_folder(tmp_path, name)
    state_dict = lavis_stage2_checkpoint(name)
    checkpoint = save_checkpoint(tmp_path / f"blip2_{name}.pth", state_dict)
    output = tmp_path / "converted"
    argv = ["convert", "--from", "lavis", str(checkpoint), "--output", str(output), "--language-model", str(llm_folder)]
    argv += ["--vision", write_json(tmp_path / "v.json", EVA_CONFIG)]
    argv += ["--qformer-config", write_json(tmp_path / "q.json", QFORMER_CONFIG)]
    assert main(argv) == 0
    assert "LAVIS stage 2" in capsys.readouterr().out

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert isinstance(model, Blip2BridgeForConditionalGeneration)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == len(make_llm_tokenizer(name))
    assert model.config.text_config.model_type == name
    if name == "t5":
        assert model.config.text_config.dense_act_fn == "gelu"
    # Generation ends where LAVIS's does: "\n" for OPT, the EOS for T5; saved and loaded with the folder.
    stop_id = tokenizer("\n", add_special_tokens=False).input_ids[0] if name == "opt" else tokenizer.eos_token_id
    assert model.config.text_config.eos_token_id == model.language_model.generation_config.eos_token_id == stop_id
    torch.testing.assert_close(model.language_projection.weight, state_dict[f"{LAVIS_PROJECTIONS[name]}.weight"])
    assert torch.equal(model.query_tokens, state_dict["query_tokens"])

    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    prompt = tokenizer(["what is in the photo", "a"], padding=True, return_tensors="pt")
    target = tokenizer(["a photo of a cat", "two dogs run"], padding=True, return_tensors="pt")
    expected = lavis_stage2_forward(name, llm_folder, state_dict, pixel_values, prompt, target)

    text = prompt if name == "t5" else target
    placeholders = torch.full((2, LAVIS_QFORMER["num_query_tokens"]), model.config.image_token_id)
    input_ids = torch.cat([placeholders, text.input_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(placeholders), text.attention_mask], dim=1)
    targets = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    if name == "t5":
        kwargs = dict(labels=targets, decoder_attention_mask=target.attention_mask)
    else:
        kwargs = dict(labels=torch.cat([placeholders, targets], dim=1))  # image positions are never targets
    with torch.no_grad():
        actual = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert expected.logits.abs().max() > 0.1
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-6)


def test_stage2_checkpoint_llm_tensors_replace_the_pretrained_ones_and_text_side_is_ignored(tmp_path):
    from tests.tiny_models import tiny_llm

    state_dict = lavis_stage2_checkpoint("opt")
    saved_norm = torch.full((16,), 3.0)
    state_dict["opt_model.model.decoder.final_layer_norm.weight"] = saved_norm
    # A checkpoint saved whole still holds the stage-1 text side; stage 2 ignores it.
    state_dict["Qformer.cls.predictions.bias"] = torch.zeros(LAVIS_QFORMER["vocab_size"])
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", state_dict)
    tower = dict(vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG)
    model = convert_lavis_checkpoint(checkpoint, tmp_path / "out", language_model=tiny_llm("opt", 99), **tower)
    assert torch.equal(model.language_model.model.decoder.final_layer_norm.weight, saved_norm)
    assert model.config.image_token_id == 99  # no tokenizer: a new LLM row
    assert model.language_model.get_input_embeddings().weight.shape[0] == 100

    state_dict["opt_model.model.decoder.no_such.weight"] = torch.zeros(3)
    save_checkpoint(checkpoint, state_dict)
    with pytest.raises(ValueError, match="do not fit the language model given, e.g. opt_model.model.decoder.no_such"):
        convert_lavis_checkpoint(checkpoint, tmp_path / "out2", language_model=tiny_llm("opt", 99), **tower)


def test_stage2_refusals_name_the_problem(tmp_path):
    from tests.tiny_models import TEXT_CONFIGS

    wide_llm = AutoConfig.for_model(**dict(TEXT_CONFIGS["opt"], hidden_size=24, word_embed_proj_dim=24))
    with pytest.raises(ValueError, match=r"opt_proj.weight has shape \(16, 32\).*hidden_size 24"):
        lavis_config_from_state_dict(lavis_stage2_checkpoint("opt"), vision=EVA_CONFIG, text_config=wide_llm)
    instruct = {**lavis_stage2_checkpoint("opt"), "llm_proj.weight": torch.zeros(16, 32)}
    with pytest.raises(ValueError, match="'llm_proj.weight': an InstructBLIP checkpoint"):
        lavis_config_from_state_dict(instruct, text_config=wide_llm)
    with pytest.raises(ValueError, match="stage-1 checkpoint .* which has none"):
        lavis_config_from_state_dict(lavis_checkpoint("eva"), vision=EVA_CONFIG, text_config=wide_llm)


def test_cli_converts_a_lavis_stage2_checkpoint_straight_to_transformers_blip2(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    llm_folder = tiny_language_model_folder(tmp_path, "opt")
    checkpoint = save_checkpoint(tmp_path / "blip2_opt.pth", lavis_stage2_checkpoint("opt"))
    tower = ["--vision", write_json(tmp_path / "v.json", EVA_CONFIG)]
    tower += ["--qformer-config", write_json(tmp_path / "q.json", QFORMER_CONFIG)]
    common = ["convert", "--from", "lavis", str(checkpoint), "--language-model", str(llm_folder), *tower]
    assert main([*common, "--output", str(tmp_path / "ours")]) == 0
    assert main([*common, "--to", "transformers", "--output", str(tmp_path / "hf")]) == 0

    ours = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").eval()
    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image_token_id = AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids("<image>")
    assert image_token_id == theirs.config.image_token_index == ours.config.image_token_id
    placeholders = torch.full((2, LAVIS_QFORMER["num_query_tokens"]), image_token_id)
    input_ids = torch.cat([placeholders, torch.tensor([[2, 40, 32]] * 2)], 1)
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = theirs(pixel_values=pixel_values, input_ids=input_ids).logits
    # transformers' post_layernorm takes the EVA blocks' eps 1e-6 where LAVIS's ln_vision has 1e-5: close, not equal.
    assert theirs.vision_model.post_layernorm.eps == 1e-6
    assert (actual - expected).abs().max() <= 1e-4


def test_converting_a_missing_blip2_bridge_folder_names_the_missing_folder(tmp_path, capsys):
    missing = tmp_path / "blip2-opt"
    assert main(["convert", "--from", "blip2-bridge", str(missing), "--to", "transformers", "--output",
                 str(tmp_path / "out")]) == 1  # fmt: skip
    assert f"model folder {missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["hello\n", "", "truncated"], ids=["text", "empty", "truncated"])
def test_a_file_that_is_not_a_readable_checkpoint_is_one_line_naming_it(tmp_path, capsys, content):
    path = tmp_path / "blip2_pretrained.pth"
    if content == "truncated":
        torch.save({"model": {"query_tokens": torch.zeros(1, 4, 8)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text(content)
    assert main(["convert", "--from", "lavis", str(path), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"{path} ({path.stat().st_size} bytes) is not a readable PyTorch checkpoint" in error
    assert not (tmp_path / "out").exists()
