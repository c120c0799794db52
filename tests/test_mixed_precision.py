"""Mixed precision on CPU (issue #15, item 3): bf16 autocast, a bf16 or fp16 frozen tower beside a float32 Q-Former,
and the float32 Q-Former keeping the losses finite where a model run wholly in fp16 overflows (LAVIS issue 267).

Tolerances are about 3x the differences measured on torch 2.13 CPU (written beside each); each test also asserts that
the lower precision really ran (a non-zero difference), so that a silently float32 run cannot pass."""

import copy

import pytest
import torch

from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeModel
from tests.tiny_models import IMAGE_TOKEN_ID, prompts, tiny_batch, tiny_model, tiny_stage2_config

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ("loss_itc", "loss_itm", "loss_itg")


def stage1_inputs():
    pixel_values, input_ids, attention_mask = tiny_batch()
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)


def differences(output, reference) -> dict[str, float]:
    return {name: (getattr(output, name).float() - getattr(reference, name)).abs().item() for name in LOSSES}


def assert_within(measured: dict[str, float], tolerances: dict[str, float]):
    for name, tolerance in tolerances.items():
        assert measured[name] < tolerance, (name, measured)
    assert max(measured.values()) > 0, measured  # the lower precision did run


def test_bf16_autocast_stage1_losses_match_float32_and_gradients_are_finite():
    model = tiny_model().eval()
    inputs = stage1_inputs()
    with torch.no_grad():
        reference = model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs)
    # Measured: itc 7.0e-3, itm 1.0e-3, itg 2.2e-3. ITC's logits are bf16 similarities (the matmul) over temp = 0.07,
    # which multiplies their rounding by 14: logits off by up to 0.13 against float32's.
    assert_within(differences(output, reference), {"loss_itc": 1.5e-2, "loss_itm": 3e-3, "loss_itg": 7e-3})
    assert output.loss.dtype == torch.float32
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values()), [name for name, g in grads.items() if g is None]
    assert all(torch.isfinite(grad).all() and grad.dtype == torch.float32 for grad in grads.values())
    assert grads["query_tokens"].abs().sum() > 0
    assert all(p.grad is None for p in model.vision_model.parameters())  # the frozen tower


def test_bf16_frozen_tower_beside_a_float32_qformer():
    model = tiny_model().eval()
    inputs = stage1_inputs()
    with torch.no_grad():
        reference = model(**inputs)
        model.vision_model.to(torch.bfloat16)
        # float32 pixels are cast to the tower's dtype, its features to the (float32) LayerNorm's.
        image_embeds = model.get_image_embeds(inputs["pixel_values"])
        output = model(**inputs)
    assert image_embeds.dtype == torch.float32 and output.loss.dtype == torch.float32
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    # Measured: itc 3.0e-3, itm 1.4e-4, itg 9.7e-4.
    assert_within(differences(output, reference), {"loss_itc": 9e-3, "loss_itm": 5e-4, "loss_itg": 3e-3})


def test_bf16_autocast_stage2_loss_matches_float32():
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(tiny_stage2_config("opt")).eval()
    pixel_values, input_ids, attention_mask = prompts()
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        reference = model(**inputs).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(**inputs)
    difference = (output.loss.float() - reference).abs().item()
    assert output.logits.dtype == torch.bfloat16  # the LLM's head ran under autocast
    # Measured: 1.03e-4 (on a loss of about 4.6).
    assert 0 < difference < 3e-4, difference


def test_fp16_frozen_tower_beside_a_float32_qformer():
    # As LAVIS: the ViT in fp16, the Q-Former in float32.
    model = tiny_model().eval()
    inputs = stage1_inputs()
    with torch.no_grad():
        reference = model(**inputs)
        model.vision_model.to(torch.float16)
        output = model(**inputs)
    assert torch.isfinite(output.loss)
    # Measured: itc 1.1e-3, itm 4.8e-5, itg 8.0e-5.
    assert_within(differences(output, reference), {"loss_itc": 3.5e-3, "loss_itm": 1.5e-4, "loss_itg": 2.5e-4})


def test_fp16_loading_keeps_the_losses_finite_where_a_wholly_fp16_model_overflows(tmp_path):
    # A vision LayerNorm with a large gain (x1e4) gives image embeddings up to ~2.9e4: still within fp16's range
    # (65504), but the Q-Former's cross-attention overflows on them in fp16.
    model = tiny_model().eval()
    with torch.no_grad():
        model.vision_layernorm.weight.mul_(1e4)
    inputs = stage1_inputs()
    with torch.no_grad():
        reference = model(**inputs)
        largest = model.get_image_embeds(inputs["pixel_values"]).abs().max().item()
    assert 1e4 < largest < torch.finfo(torch.float16).max  # measured 2.88e4
    assert torch.isfinite(reference.loss)

    naive = copy.deepcopy(model).half()
    with torch.no_grad(), pytest.raises(ValueError, match=r"ITC similarities hold NaN .* image_feats are not finite"):
        naive(**dict(inputs, pixel_values=inputs["pixel_values"].half()))

    model.save_pretrained(tmp_path)
    loaded = Blip2BridgeModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert {p.dtype for p in loaded.vision_model.parameters()} == {torch.float16}
    assert {p.dtype for n, p in loaded.named_parameters() if not n.startswith("vision_model.")} == {torch.float32}
    with torch.no_grad():
        output = loaded(**inputs)
    assert all(torch.isfinite(getattr(output, name)) for name in ("loss", *LOSSES))
    # Measured: itc 4.3e-2, itm 2.4e-3, itg 4.9e-3 (the large gain magnifies the fp16 tower's rounding).
    assert_within(differences(output, reference), {"loss_itc": 0.13, "loss_itm": 8e-3, "loss_itg": 1.6e-2})
