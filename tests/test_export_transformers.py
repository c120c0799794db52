"""Export to transformers' BLIP-2: our stage-2 model saved as a `Blip2ForConditionalGeneration` folder."""

import logging

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, CLIPVisionConfig

from modeling_blip2 import Blip2BridgeForConditionalGeneration
from modeling_blip2.builders import build_stage2_model
from modeling_blip2.cli import main
from modeling_blip2.export_transformers import export_to_transformers
from tests.helpers import make_llm_tokenizer
from tests.tiny_models import TEXT_CONFIGS, decoder_inputs, prompts, tiny_stage2_config
from tests.tiny_models import tiny_llm
from tests.tiny_models import tiny_model


def random_stage2_model(text: str, **overrides) -> Blip2BridgeForConditionalGeneration:
    torch.manual_seed(0)
    # transformers' post_layernorm takes the vision layers' eps (1e-6 here): ours matches it for an exact export.
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config(text, vision_layer_norm_eps=1e-6, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():  # query tokens start at zero, norms at one: make every weight count
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
def test_exported_model_loads_in_transformers_with_identical_logits_and_greedy_tokens(text, tmp_path):
    ours = random_stage2_model(text)
    export_to_transformers(ours, tmp_path)
    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert theirs.config.image_token_index == ours.config.image_token_id
    pixel_values, input_ids, attention_mask = prompts(left_pad=text == "opt")
    with torch.no_grad():
        inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        expected = ours(**inputs, **decoder_inputs(text)).logits
        actual = theirs(**inputs, **decoder_inputs(text)).logits
    assert expected.abs().max() > 0.5
    assert (actual - expected).abs().max() <= 1e-5
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert theirs.generate(**inputs, **greedy).tolist() == ours.generate(**inputs, **greedy).tolist()

    # And back: transformers' folder loads into ours with the same tensors.
    reloaded = Blip2BridgeForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in ours.state_dict().items():
        if not name.startswith("vision_model.post_layernorm."):  # never applied; not exported
            torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_a_model_reading_the_penultimate_vision_layer_exports_the_tower_cut_after_it(tmp_path):
    """The original's layout (EVA ViT-g keeps 39 of its 40 blocks): transformers' BLIP-2 gets the blocks read."""
    ours = random_stage2_model("opt", vision_feature_layer=-2)
    export_to_transformers(ours, tmp_path)
    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert theirs.config.vision_config.num_hidden_layers == ours.config.vision_config.num_hidden_layers - 1
    pixel_values, input_ids, attention_mask = prompts(left_pad=True)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        expected = ours(**inputs).logits
        actual = theirs(**inputs).logits
        ours.config.vision_feature_layer = -1  # the last layer: what an uncut export would read
        reading_the_last_layer = ours(**inputs).logits
    assert (reading_the_last_layer - expected).abs().max() > 1e-3
    assert (actual - expected).abs().max() <= 1e-5


def test_cli_exports_a_built_stage2_folder_with_its_tokenizer(tmp_path, capsys):
    tokenizer = make_llm_tokenizer("opt")
    stage1 = tiny_model(attn_implementation="sdpa", vision_layer_norm_eps=1e-6)
    ours = build_stage2_model(stage1, tiny_llm("opt"), tokenizer=tokenizer)
    ours.save_pretrained(tmp_path / "ours")
    tokenizer.save_pretrained(tmp_path / "ours")
    argv = ["convert", "--from", "blip2-bridge", str(tmp_path / "ours"), "--to", "transformers"]
    assert main([*argv, "--output", str(tmp_path / "hf")]) == 0
    assert "transformers Blip2ForConditionalGeneration" in capsys.readouterr().out

    from transformers import AutoTokenizer

    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    image_token_id = exported_tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id == theirs.config.image_token_index == ours.config.image_token_id
    text = exported_tokenizer(["a photo of a cat", "two dogs run"], padding=True, return_tensors="pt")
    input_ids = torch.cat([torch.full((2, 4), image_token_id), text.input_ids], dim=1)
    pixel_values = prompts()[0]
    with torch.no_grad():
        expected = ours(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = theirs(pixel_values=pixel_values, input_ids=input_ids).logits
    assert (actual - expected).abs().max() <= 1e-5


def test_models_transformers_cannot_express_are_refused(tmp_path, capsys):
    clip_config = tiny_stage2_config()
    clip_config.vision_config = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    with pytest.raises(ValueError, match="'clip_vision_model' model; transformers' BLIP-2 holds a Blip2VisionModel"):
        export_to_transformers(Blip2BridgeForConditionalGeneration(clip_config))
    with pytest.raises(ValueError, match=r"vision_feature_layer=None; .* expected -1 to -2"):
        export_to_transformers(Blip2BridgeForConditionalGeneration(tiny_stage2_config(vision_feature_layer=None)))
    with pytest.raises(ValueError, match="model is a Blip2BridgeModel; only a stage-2"):
        export_to_transformers(tiny_model())

    tiny_model().save_pretrained(tmp_path / "stage1")
    argv = ["convert", "--from", "blip2-bridge", str(tmp_path / "stage1"), "--to", "transformers"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 1
    assert "only a stage-2 Blip2BridgeForConditionalGeneration exports" in capsys.readouterr().err


def test_different_vision_norm_eps_is_exported_with_a_warning(caplog):
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config())  # vision layers 1e-6, vision_layernorm 1e-5
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.export_transformers"):
        exported = export_to_transformers(model)
    assert "our vision_layernorm has eps 1e-05" in caplog.text
    assert exported.vision_model.post_layernorm.eps == 1e-6
