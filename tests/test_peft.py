"""LoRA through peft on the stage-2 model: on the LLM and on the Q-Former, saved, loaded, merged."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_blip2 import Blip2BridgeForConditionalGeneration
from tests.tiny_models import NUM_QUERY_TOKENS, QFORMER_CONFIG, TEXT_CONFIGS, VISION_CONFIG, prompts, tiny_stage2_config


RANK = 4
LLM_TARGETS = r"language_model\..*\.(q_proj|v_proj)"
QFORMER_TARGETS = r"qformer\.layer\.\d+\.(attention|crossattention)\.(query|value)"


def base_model(seed: int = 0) -> Blip2BridgeForConditionalGeneration:
    torch.manual_seed(seed)
    return Blip2BridgeForConditionalGeneration(tiny_stage2_config("opt")).eval()


def lora_config(targets: str, task_type: str | None = None) -> LoraConfig:
    # Random B (peft's default is zero) so that the adapters change the outputs from the first step.
    return LoraConfig(r=RANK, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=task_type)


def hand_counted_lora_parameters() -> int:
    """A rank-r adapter on a (fan_in -> fan_out) linear adds A (r x fan_in) and B (fan_out x r)."""
    adapter = lambda fan_in, fan_out: RANK * (fan_in + fan_out)  # noqa: E731
    llm_width, llm_layers = TEXT_CONFIGS["opt"]["hidden_size"], TEXT_CONFIGS["opt"]["num_hidden_layers"]
    llm = llm_layers * 2 * adapter(llm_width, llm_width)  # q_proj, v_proj
    width, vision_width = QFORMER_CONFIG["hidden_size"], VISION_CONFIG["hidden_size"]
    qformer = 0
    for layer_idx in range(QFORMER_CONFIG["num_hidden_layers"]):
        qformer += 2 * adapter(width, width)  # self-attention query, value
        if layer_idx % 2 == 0:  # cross-attention: the query reads the Q-Former, the value the image features
            qformer += adapter(width, width) + adapter(vision_width, width)
    return llm + qformer


def outputs(model, **generate_kwargs):
    pixel_values, input_ids, attention_mask = prompts(left_pad=True)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return logits, tokens


def test_lora_on_llm_and_qformer_trains_exactly_the_adapters_counted_by_hand():
    model = get_peft_model(base_model(), lora_config(f"{LLM_TARGETS}|{QFORMER_TARGETS}"))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == hand_counted_lora_parameters() == 3008
    assert any(".qformer." in name for name in trainable) and any(".language_model." in name for name in trainable)

    model.train()
    pixel_values, input_ids, _ = prompts()
    model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_adapters_change_outputs_and_merged_model_gives_the_same_logits_and_tokens(task_type):
    base_logits, _ = outputs(base_model())
    model = get_peft_model(base_model(), lora_config(f"{LLM_TARGETS}|{QFORMER_TARGETS}", task_type)).eval()
    lora_logits, lora_tokens = outputs(model)
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters are in the path, Q-Former's too

    merged = model.merge_and_unload()
    assert type(merged) is Blip2BridgeForConditionalGeneration
    merged_logits, merged_tokens = outputs(merged)
    assert (merged_logits - lora_logits).abs().max() <= 1e-5
    assert merged_tokens.tolist() == lora_tokens.tolist()
    assert lora_tokens.shape == (2, NUM_QUERY_TOKENS + 5 + 5)


def test_saved_adapters_load_onto_the_base_model_with_identical_logits(tmp_path):
    base_model().save_pretrained(tmp_path / "base")
    model = get_peft_model(base_model(), lora_config(LLM_TARGETS)).eval()
    model.save_pretrained(tmp_path / "adapters")
    saved = {path.name for path in (tmp_path / "adapters").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved

    reloaded = PeftModel.from_pretrained(
        Blip2BridgeForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "adapters"
    ).eval()
    expected_logits, expected_tokens = outputs(model)
    actual_logits, actual_tokens = outputs(reloaded)
    torch.testing.assert_close(actual_logits, expected_logits, rtol=0, atol=0)
    assert actual_tokens.tolist() == expected_tokens.tolist()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_an_instruction_aware_model_takes_adapters_and_its_instruction_through_peft(task_type):
    # InstructBLIP fine-tuning with LoRA: the instruction reaches the Q-Former through PEFT's wrappers (forward and
    # generate), the adapters on its text feed-forward train, and the merged model answers as the adapted one.
    def instruction_aware(seed: int = 0):
        torch.manual_seed(seed)
        return Blip2BridgeForConditionalGeneration(tiny_stage2_config("opt", use_text_input=True)).eval()

    pixel_values, input_ids, attention_mask = prompts(left_pad=True)
    instruction = torch.tensor([[2, 17, 33, 3], [2, 40, 3, 0]])
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                  qformer_input_ids=instruction, qformer_attention_mask=(instruction != 0).long())
    targets = f"{LLM_TARGETS}|{QFORMER_TARGETS}|" + r"qformer\.layer\.\d+\.text_feed_forward\.intermediate"
    model = get_peft_model(instruction_aware(), lora_config(targets, task_type))
    model.train()
    model(**inputs, labels=input_ids).loss.backward()
    last = QFORMER_CONFIG["num_hidden_layers"] - 1
    text_adapters = {n: p for n, p in model.named_parameters() if "text_feed_forward" in n and p.requires_grad}
    # The instruction's outputs of the last layer are never read (only the queries reach the LLM): not computed.
    read = {n: p for n, p in text_adapters.items() if f".layer.{last}." not in n}
    assert read and all(p.grad is not None and p.grad.abs().sum() > 0 for p in read.values())
    assert all(p.grad is None for n, p in text_adapters.items() if n not in read)

    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        other = model(**{**inputs, "qformer_input_ids": instruction.flip(1)}).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (logits - other).abs().max() > 1e-3  # the instruction reaches the queries through PEFT
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
    assert merged.generate(**inputs, max_new_tokens=4, do_sample=False).tolist() == tokens.tolist()
