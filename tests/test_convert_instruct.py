"""The LAVIS converter on InstructBLIP checkpoints (blip2_vicuna_instruct, blip2_t5_instruct): tiny random checkpoints
in LAVIS's layout, converted with their LLM, against a re-statement of the original's forward
(tests/lavis_instruct_reference.py)."""

import copy
import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from modeling_blip2 import Blip2BridgeForConditionalGeneration
from modeling_blip2.cli import main
from modeling_blip2.convert_lavis import lavis_config_from_state_dict, lavis_stage2_model_of
from tests.helpers import CAPTIONS, make_bert_tokenizer
from tests.lavis_instruct_reference import LavisInstructBlip, cross_entropy_mean, lavis_llama_tokens
from tests.lavis_reference import lavis_state_dict_random
from tests.lavis_checkpoints import (
    EVA_CONFIG,
    IMAGE,
    LAVIS_QFORMER,
    QFORMER_CONFIG,
    TOWERS,
    lavis_stage2_checkpoint,
    lavis_vision_features,
    save_checkpoint,
    tiny_language_model_folder,
    write_json,
)


LLM_WIDTH = 16
NUM_QUERY_TOKENS = LAVIS_QFORMER["num_query_tokens"]
# What LAVIS's instruct models set to None: the ITG head (Qformer.cls) and the stage-1 heads; the text side stays.
LAVIS_INSTRUCT_DROPS = re.compile(r"Qformer\.cls\.|vision_proj\.|text_proj\.|itm_head\.|temp$")
INSTRUCTIONS = ["what is in the picture?", "describe the image."]
OTHER_INSTRUCTIONS = ["how many dogs run?", "is it raining?"]
PROMPTS = ["question: what is in the picture? answer:", "a photo of"]
ANSWERS = ["a cat sitting on a red sofa", "two dogs"]
QFORMER_WEIGHT_SCALE = 10.0
GREEDY = dict(do_sample=False, num_beams=1, max_new_tokens=6)


def qformer_tokenizer():
    """LAVIS's Q-Former tokenizer: BERT's, with "[DEC]" as bos (`Blip2Base.init_tokenizer`)."""
    return make_bert_tokenizer(extra_texts=INSTRUCTIONS + OTHER_INSTRUCTIONS)


def lavis_instruct_checkpoint(projection: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """A blip2_vicuna_instruct (`llm_proj`) / blip2_t5_instruct (`t5_proj`) state dict: the stage-1 dict with the
    Q-Former resized to LAVIS's tokenizer, without what the instruct models drop, plus the projection and the tower."""
    stage1 = lavis_state_dict_random(dict(LAVIS_QFORMER, vocab_size=vocab_size), seed=0)
    state_dict = {key: value for key, value in stage1.items() if not LAVIS_INSTRUCT_DROPS.match(key)}
    # Weights of std 0.02 leave the queries nearly blind to the instruction (uniform attention, small feed-forward
    # outputs): larger ones make every part of the text path count in the query outputs.
    for key, value in state_dict.items():
        if key.startswith("Qformer.bert.encoder.") and key.endswith(".weight") and "LayerNorm" not in key:
            state_dict[key] = value * QFORMER_WEIGHT_SCALE
    state_dict.update({f"visual_encoder.{name}": weight for name, weight in TOWERS["eva"][0]().items()})
    generator = torch.Generator().manual_seed(12)
    state_dict[f"{projection}.weight"] = 0.2 * torch.randn(LLM_WIDTH, LAVIS_QFORMER["hidden_size"], generator=generator)
    state_dict[f"{projection}.bias"] = 0.1 * torch.randn(LLM_WIDTH, generator=generator)
    return state_dict


def tiny_vicuna_folder(tmp_path):
    """A tiny Llama with a Llama tokenizer ("<unk>"=0, "<s>"=1, "</s>"=2, "<s>" before every text) whose embedding
    table has exactly one row per token, as Vicuna's 32000."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([*CAPTIONS, *PROMPTS, *ANSWERS], trainer=trainer)
    model_json = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split()) for merge in model_json["merges"]]
    tokenizer = LlamaTokenizer(vocab=model_json["vocab"], merges=merges, add_bos_token=True)
    assert tokenizer("a cat").input_ids[0] == tokenizer.bos_token_id == 1

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLM_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(3)
    folder = tmp_path / "vicuna-llm"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def convert(tmp_path, name, state_dict, llm_folder):
    checkpoint = save_checkpoint(tmp_path / f"{name}.pth", state_dict)
    output = tmp_path / f"{name}-converted"
    argv = ["convert", "--from", "lavis", str(checkpoint), "--output", str(output), "--language-model", str(llm_folder)]
    argv += ["--vision", write_json(tmp_path / "v.json", EVA_CONFIG)]
    argv += ["--qformer-config", write_json(tmp_path / "q.json", QFORMER_CONFIG)]
    assert main(argv) == 0
    return AutoModelForImageTextToText.from_pretrained(output).eval(), AutoTokenizer.from_pretrained(output)


def reference(state_dict, bert_tokenizer, projection, llm):
    config = dict(LAVIS_QFORMER, vocab_size=len(bert_tokenizer))
    return LavisInstructBlip(config, state_dict, projection, llm).eval()


def check_converted_qformer(model, bert_tokenizer):
    assert isinstance(model, Blip2BridgeForConditionalGeneration)
    qformer_config = model.config.qformer_config
    assert qformer_config.use_text_input
    assert qformer_config.vocab_size == len(bert_tokenizer)
    assert model.qformer.word_embeddings.weight.shape == (len(bert_tokenizer), LAVIS_QFORMER["hidden_size"])


def pixels():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


def test_blip2_vicuna_instruct_converts_with_its_llm_and_reproduces_the_original(tmp_path):
    bert_tokenizer = qformer_tokenizer()
    llm_folder = tiny_vicuna_folder(tmp_path)
    original_tokenizer = AutoTokenizer.from_pretrained(llm_folder)
    num_tokens = len(original_tokenizer)
    state_dict = lavis_instruct_checkpoint("llm_proj", len(bert_tokenizer))
    model, tokenizer = convert(tmp_path, "blip2_vicuna_instruct", state_dict, llm_folder)
    check_converted_qformer(model, bert_tokenizer)

    # LAVIS's LLM tokenizer: "[PAD]" a new token, "</s>" as bos/eos/unk, so prompts start with "</s>"; then "<image>".
    eos_id = original_tokenizer.eos_token_id
    pad_id = num_tokens  # LAVIS's "[PAD]": the row resize_token_embeddings appends
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.bos_token, tokenizer.eos_token) == (
        "[PAD]", pad_id, "</s>", "</s>"
    )  # fmt: skip
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == num_tokens + 1
    assert model.language_model.get_input_embeddings().weight.shape[0] == num_tokens + 2
    prompt_pieces = [original_tokenizer(text, add_special_tokens=False).input_ids for text in PROMPTS]
    answer_pieces = [original_tokenizer(text, add_special_tokens=False).input_ids for text in ANSWERS]
    for text, pieces in zip(PROMPTS, prompt_pieces):
        assert tokenizer(text).input_ids == [eos_id, *pieces]

    # The original: the LLM from its folder, resized to LAVIS's tokenizer. LAVIS draws the "[PAD]" row at random at
    # every load, and transformers' BLIP-2 convention needs a row for "<image>", which the original lacks: both are
    # the converted model's. Every pretrained row is the folder's on both sides.
    llm = AutoModelForCausalLM.from_pretrained(llm_folder).eval()
    ours_llm = model.language_model
    for ours_table, table in ((ours_llm.get_input_embeddings(), llm.get_input_embeddings()),
                              (ours_llm.get_output_embeddings(), llm.get_output_embeddings())):  # fmt: skip
        assert torch.equal(ours_table.weight[:num_tokens], table.weight)
    lavis_table_llm = copy.deepcopy(llm)  # the original's own table: one "[PAD]" row more, no "<image>" row
    llm.resize_token_embeddings(num_tokens + 2)
    with torch.no_grad():
        llm.get_input_embeddings().weight[num_tokens:] = ours_llm.get_input_embeddings().weight[num_tokens:]
        llm.get_output_embeddings().weight[num_tokens:] = ours_llm.get_output_embeddings().weight[num_tokens:]
    lavis = reference(state_dict, bert_tokenizer, "llm_proj", llm)

    pixel_values = pixels()
    image_embeds = lavis_vision_features("eva", state_dict, pixel_values)

    def lavis_forward(instructions):
        with torch.no_grad():
            return lavis.vicuna_forward(
                image_embeds,
                bert_tokenizer(instructions, padding="longest", return_tensors="pt"),
                lavis_llama_tokens(prompt_pieces, eos_id, pad_id),
                lavis_llama_tokens(answer_pieces, eos_id, pad_id, eos_token_id=eos_id),
                pad_id,
            )

    expected = lavis_forward(INSTRUCTIONS)

    # Ours, from our tokenizer: [placeholders; prompt; answer; eos], right-padded to the original's length.
    length = expected["logits"].shape[1]
    rows, label_rows = [], []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        prompt_ids = tokenizer(prompt).input_ids
        answer_ids = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        row = [model.config.image_token_id] * NUM_QUERY_TOKENS + prompt_ids + answer_ids
        labels = [-100] * (NUM_QUERY_TOKENS + len(prompt_ids)) + answer_ids
        rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
        label_rows.append(labels + [-100] * (length - len(labels)))
    input_ids, labels = torch.tensor(rows), torch.tensor(label_rows)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()

    def ours_forward(instructions):
        qformer_inputs = bert_tokenizer(instructions, padding="longest", return_tensors="pt")
        with torch.no_grad():
            return model(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                qformer_input_ids=qformer_inputs.input_ids,
                qformer_attention_mask=qformer_inputs.attention_mask,
            )

    actual = ours_forward(INSTRUCTIONS)
    torch.testing.assert_close(attention_mask, expected["attention_mask"])
    assert torch.equal(labels, expected["targets"])
    assert expected["logits"].abs().max() > 0.1
    torch.testing.assert_close(actual.image_features, expected["inputs_llm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.logits, expected["logits"], rtol=0, atol=1e-4)
    assert abs(actual.loss.item() - expected["loss"].item()) <= 1e-5 * expected["loss"].item()

    # The instruction reaches the queries: another one changes the loss, on both sides alike.
    other_actual, other_expected = ours_forward(OTHER_INSTRUCTIONS), lavis_forward(OTHER_INSTRUCTIONS)
    assert abs(other_actual.loss.item() - actual.loss.item()) > 1e-4
    assert abs(other_actual.loss.item() - other_expected["loss"].item()) <= 1e-5 * other_expected["loss"].item()

    # Greedy generation from the first image, prompt and instruction (LAVIS's generate feeds the same embeddings).
    qformer_inputs = bert_tokenizer(INSTRUCTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        inputs_llm, atts_llm = lavis.query_inputs(image_embeds[:1], qformer_inputs)
    prompt = lavis_llama_tokens(prompt_pieces[:1], eos_id, pad_id)
    expected_tokens = llm.generate(
        inputs_embeds=torch.cat([inputs_llm, llm.get_input_embeddings()(prompt.input_ids)], dim=1),
        attention_mask=torch.cat([atts_llm, prompt.attention_mask], dim=1),
        **GREEDY,
    )
    prompt_ids = torch.tensor([[model.config.image_token_id] * NUM_QUERY_TOKENS + tokenizer(PROMPTS[0]).input_ids])
    tokens = model.generate(
        pixel_values=pixel_values[:1],
        input_ids=prompt_ids,
        qformer_input_ids=qformer_inputs.input_ids,
        qformer_attention_mask=qformer_inputs.attention_mask,
        **GREEDY,
    )
    assert torch.equal(tokens[:, prompt_ids.shape[1] :], expected_tokens)

    # With the original's own table (no "<image>" row): the logits of every token it has are ours, and its loss is
    # ours over those tokens; the "<image>" output is the one thing the original lacks (Vicuna has no spare row).
    lavis_table_llm.resize_token_embeddings(num_tokens + 1)
    with torch.no_grad():
        lavis_table_llm.get_input_embeddings().weight[num_tokens] = ours_llm.get_input_embeddings().weight[num_tokens]
        lavis_table_llm.get_output_embeddings().weight[num_tokens] = ours_llm.get_output_embeddings().weight[num_tokens]
    lavis.llm = lavis_table_llm.eval()
    original = lavis_forward(INSTRUCTIONS)
    assert original["logits"].shape[-1] == num_tokens + 1
    torch.testing.assert_close(actual.logits[..., : num_tokens + 1], original["logits"], rtol=0, atol=1e-4)
    loss_without_image_token = cross_entropy_mean(actual.logits[..., : num_tokens + 1], labels)
    assert abs(loss_without_image_token.item() - original["loss"].item()) <= 1e-5 * original["loss"].item()


def test_blip2_t5_instruct_converts_with_its_llm_and_reproduces_the_original(tmp_path):
    bert_tokenizer = qformer_tokenizer()
    llm_folder = tiny_language_model_folder(tmp_path, "t5")
    state_dict = lavis_instruct_checkpoint("t5_proj", len(bert_tokenizer))
    assert lavis_stage2_model_of(state_dict).name == "blip2_t5_instruct"
    model, tokenizer = convert(tmp_path, "blip2_t5_instruct", state_dict, llm_folder)
    check_converted_qformer(model, bert_tokenizer)
    assert model.config.text_config.dense_act_fn == "gelu"  # Blip2T5Instruct: t5_config.dense_act_fn = "gelu"

    from transformers import AutoModelForSeq2SeqLM

    llm_config = AutoConfig.from_pretrained(llm_folder, dense_act_fn="gelu")
    llm = AutoModelForSeq2SeqLM.from_pretrained(llm_folder, config=llm_config).eval()
    lavis = reference(state_dict, bert_tokenizer, "t5_proj", llm)
    pixel_values = pixels()
    image_embeds = lavis_vision_features("eva", state_dict, pixel_values)
    # LAVIS's t5_tokenizer / t5_output_tokenizer: T5's, "</s>" after every text, padding on the right.
    prompt = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    answer = tokenizer(ANSWERS, padding="longest", return_tensors="pt")

    def lavis_forward(instructions):
        text_qformer = bert_tokenizer(instructions, padding="longest", return_tensors="pt")
        with torch.no_grad():
            return lavis.t5_forward(image_embeds, text_qformer, prompt, answer, tokenizer.pad_token_id)

    def ours_forward(instructions):
        qformer_inputs = bert_tokenizer(instructions, padding="longest", return_tensors="pt")
        placeholders = torch.full((2, NUM_QUERY_TOKENS), model.config.image_token_id)
        with torch.no_grad():
            return model(
                pixel_values=pixel_values,
                input_ids=torch.cat([placeholders, prompt.input_ids], dim=1),
                attention_mask=torch.cat([torch.ones_like(placeholders), prompt.attention_mask], dim=1),
                labels=answer.input_ids.masked_fill(answer.attention_mask == 0, -100),
                decoder_attention_mask=answer.attention_mask,
                qformer_input_ids=qformer_inputs.input_ids,
                qformer_attention_mask=qformer_inputs.attention_mask,
            )

    expected, actual = lavis_forward(INSTRUCTIONS), ours_forward(INSTRUCTIONS)
    assert expected["logits"].abs().max() > 0.1
    torch.testing.assert_close(actual.image_features, expected["inputs_llm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.logits, expected["logits"], rtol=0, atol=1e-4)
    assert abs(actual.loss.item() - expected["loss"].item()) <= 1e-5 * expected["loss"].item()

    other_actual, other_expected = ours_forward(OTHER_INSTRUCTIONS), lavis_forward(OTHER_INSTRUCTIONS)
    assert abs(other_actual.loss.item() - actual.loss.item()) > 1e-4
    assert abs(other_actual.loss.item() - other_expected["loss"].item()) <= 1e-5 * other_expected["loss"].item()

    # Greedy generation: LAVIS's generate feeds T5's encoder [projected queries; prompt embeddings] as forward does.
    qformer_inputs = bert_tokenizer(INSTRUCTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        inputs_t5, atts_t5 = lavis.query_inputs(image_embeds[:1], qformer_inputs)
    expected_tokens = llm.generate(
        inputs_embeds=torch.cat([inputs_t5, llm.encoder.embed_tokens(prompt.input_ids[:1])], dim=1),
        attention_mask=torch.cat([atts_t5, prompt.attention_mask[:1]], dim=1),
        **GREEDY,
    )
    placeholders = torch.full((1, NUM_QUERY_TOKENS), model.config.image_token_id)
    tokens = model.generate(
        pixel_values=pixel_values[:1],
        input_ids=torch.cat([placeholders, prompt.input_ids[:1]], dim=1),
        attention_mask=torch.cat([torch.ones_like(placeholders), prompt.attention_mask[:1]], dim=1),
        qformer_input_ids=qformer_inputs.input_ids,
        qformer_attention_mask=qformer_inputs.attention_mask,
        **GREEDY,
    )
    assert torch.equal(tokens, expected_tokens)


def test_checkpoints_are_told_apart_by_projection_and_qformer_text_side():
    vocab_size = LAVIS_QFORMER["vocab_size"]
    t5_instruct = lavis_instruct_checkpoint("t5_proj", vocab_size)
    vicuna = lavis_instruct_checkpoint("llm_proj", vocab_size)
    assert lavis_stage2_model_of(t5_instruct).name == "blip2_t5_instruct"
    assert lavis_stage2_model_of(vicuna).name == "blip2_vicuna_instruct"
    # BLIP-2's blip2_t5 drops the text side; a stage-1 Q-Former saved whole keeps it with its ITG head (Qformer.cls).
    assert lavis_stage2_model_of(lavis_stage2_checkpoint("t5")).name == "blip2_t5"
    saved_whole = {**t5_instruct, "Qformer.cls.predictions.bias": torch.zeros(vocab_size)}
    assert lavis_stage2_model_of(saved_whole).name == "blip2_t5"

    from tests.tiny_models import TEXT_CONFIGS

    llama = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=LLM_WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    config = lavis_config_from_state_dict(vicuna, vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG, text_config=llama)
    assert config.qformer_config.use_text_input and config.qformer_config.vocab_size == vocab_size
    # Blip2VicunaInstruct(qformer_text_input=False) drops the text side: its queries read the image only.
    queries_only = {key: value for key, value in vicuna.items() if not key.startswith("Qformer.bert.embeddings.word_")}
    config = lavis_config_from_state_dict(queries_only, vision=EVA_CONFIG, text_config=llama)
    assert not config.qformer_config.use_text_input
    t5 = AutoConfig.for_model(**dict(TEXT_CONFIGS["t5"], d_model=LLM_WIDTH))
    config = lavis_config_from_state_dict(lavis_stage2_checkpoint("t5"), vision=EVA_CONFIG, text_config=t5)
    assert not config.qformer_config.use_text_input

    with pytest.raises(ValueError, match=r"'opt_proj.bias': a BLIP-2 checkpoint \(blip2_opt\) and 'llm_proj.bias'"):
        lavis_stage2_model_of({**vicuna, "opt_proj.bias": torch.zeros(LLM_WIDTH)})
    with pytest.raises(ValueError, match="blip2_vicuna_instruct \\(stage-2\\) checkpoint.*pass it as language_model"):
        lavis_config_from_state_dict(vicuna, vision=EVA_CONFIG)
