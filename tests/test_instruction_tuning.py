"""Instruction tuning (InstructBLIP): templates per task, the instruction collator's Q-Former and LLM inputs checked
by hand, sqrt-size mixing checked by counting, and a tiny instruction-aware stage-2 model trained through
`Blip2BridgeTrainer` and from `blip2-bridge train`."""

import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoTokenizer, pipeline

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2 import (
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeImageProcessor,
    Blip2BridgeProcessor,
    Blip2BridgeTrainer,
)
from modeling_blip2.cli import main
from modeling_blip2.processing.processing_blip2_bridge import add_image_token
from modeling_blip2.training.cli_train import load_train_dataset, parse_arguments, parse_instruction_data
from modeling_blip2.training.collators import InstructionTuningCollator, qformer_instruction_inputs
from modeling_blip2.training.datasets import load_instruction_annotations
from modeling_blip2.training.instructions import (
    INSTRUCTION_TEMPLATES,
    mix_datasets,
    render_instruction,
    sqrt_size_weights,
)
from tests.helpers import CAPTIONS, ID, IMAGE, X, make_bert_tokenizer, make_llm_tokenizer
from tests.tiny_models import NUM_QUERY_TOKENS, QFORMER_CONFIG, VISION_CONFIG, tiny_stage2_config
from tests.trainer_helpers import caption_image, frozen_state, tiny_training_arguments

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread

IMAGE_SIZE = VISION_CONFIG["image_size"]
# The answer of every VQA question about image i: the last word of its caption.
ANSWERS = [caption.split()[-1] for caption in CAPTIONS]
QUESTIONS = ["What is in the picture?", "What does the image show?"]


# ---- templates -------------------------------------------------------------------------------------------------


def test_templates_are_the_papers_lists_with_their_fields():
    assert {task: len(templates) for task, templates in INSTRUCTION_TEMPLATES.items()} == {
        "caption": 13, "vqa": 10, "ocr_vqa": 10, "vqg": 6, "classification": 20,
    }  # fmt: skip
    assert INSTRUCTION_TEMPLATES["caption"][0] == "A short image caption:"
    assert INSTRUCTION_TEMPLATES["vqa"][4] == "Question: {question} Short answer:"
    assert all("{question}" in t and "{answer}" not in t for t in INSTRUCTION_TEMPLATES["vqa"])
    assert all("{answer}" in t and "{question}" not in t for t in INSTRUCTION_TEMPLATES["vqg"])
    assert not any("{" in t for task in ("caption", "classification") for t in INSTRUCTION_TEMPLATES[task])
    sample = {"question": "What is on the sofa?", "answer": ["cat", "cat", "dog"], "caption": "A cat, on a sofa!",
              "label": "tabby cat", "ocr_tokens": ["STOP", "5th"]}
    assert render_instruction("vqa", 4, sample) == ("Question: what is on the sofa? Short answer:", "cat")
    assert render_instruction("vqg", 0, sample) == (
        "Given the image, generate a question whose answer is: cat. Question:", "what is on the sofa?")
    assert render_instruction("caption", 2, sample) == ("A photo of", "a cat, on a sofa")
    assert render_instruction("classification", 0, sample) == ("Identify the objects in this image:", "tabby cat")
    assert render_instruction("ocr_vqa", 1, sample) == (
        "OCR tokens: STOP, 5th. Question: what is on the sofa?", "cat")


# ---- the collator, by hand ------------------------------------------------------------------------------------


def word_collator(encoder_decoder=False, **kwargs):
    processor = Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    llm_tokenizer = make_llm_tokenizer("t5" if encoder_decoder else "opt", vocabulary="words")
    return InstructionTuningCollator(
        processor, llm_tokenizer, NUM_QUERY_TOKENS, is_encoder_decoder=encoder_decoder,
        qformer_tokenizer=make_bert_tokenizer(extra_texts=["Question: what is this? Answer:"]), **kwargs,
    )


VQA_SAMPLE = {"image": caption_image(0), "task": "vqa", "question": "What is this?", "answer": ["red", "red", "dog"]}


def test_decoder_only_labels_cover_the_answer_only_and_the_qformer_reads_the_instruction():
    collator = word_collator(templates={"vqa": ["Question: {question} Answer:"]})
    short = {"image": caption_image(1), "task": "caption", "caption": "a dog runs"}
    batch = collator([VQA_SAMPLE, short])
    placeholders = [IMAGE] * NUM_QUERY_TOKENS
    # [placeholders] <s> Question: what is this? Answer: red </s>; labels on "red </s>" only
    vqa_ids = placeholders + [ID["<s>"], ID["Question:"], ID["what"], ID["is"], ID["this?"], ID["Answer:"], ID["red"],
                              ID["</s>"]]
    padding = batch["input_ids"].shape[1] - len(vqa_ids)  # the caption's instruction may be longer
    assert batch["input_ids"][0].tolist() == vqa_ids + [ID["<pad>"]] * padding
    assert batch["labels"][0].tolist() == [X] * (NUM_QUERY_TOKENS + 6) + [ID["red"], ID["</s>"]] + [X] * padding
    assert batch["attention_mask"][0].tolist() == [1] * len(vqa_ids) + [0] * padding
    # the caption's instruction is one of the 13 caption templates, whose words the word-level tokenizer may not
    # know: check its layout, the prompt masked, "a dog runs </s>" the targets, the rest padding
    caption_labels = [label for label in batch["labels"][1].tolist() if label != X]
    assert caption_labels == [ID["a"], ID["dog"], ID["runs"], ID["</s>"]]
    assert batch["input_ids"][1, :NUM_QUERY_TOKENS].tolist() == placeholders
    assert batch["labels"][1, :NUM_QUERY_TOKENS + 1].tolist() == [X] * (NUM_QUERY_TOKENS + 1)

    qformer_tokenizer = collator.qformer_tokenizer
    tokens = qformer_tokenizer.convert_ids_to_tokens(batch["qformer_input_ids"][0])
    expected = ["[CLS]", "question", ":", "what", "is", "this", "?", "answer", ":", "[SEP]"]
    padding = len(tokens) - len(expected)
    assert tokens == expected + ["[PAD]"] * padding
    assert batch["qformer_attention_mask"][0].tolist() == [1] * len(expected) + [0] * padding
    # the caption sample's Q-Former text is its drawn caption template, padded to the batch
    length = int(batch["qformer_attention_mask"][1].sum())
    drawn = qformer_tokenizer.decode(batch["qformer_input_ids"][1, :length], skip_special_tokens=True)
    assert drawn in [qformer_tokenizer.decode(qformer_tokenizer(t)["input_ids"], skip_special_tokens=True)
                     for t in INSTRUCTION_TEMPLATES["caption"]]
    assert batch["qformer_input_ids"][1, length:].eq(qformer_tokenizer.pad_token_id).all()


def test_encoder_decoder_puts_the_instruction_in_the_encoder_and_the_answer_in_the_decoder():
    collator = word_collator(encoder_decoder=True, templates={"vqa": ["Question: {question} Answer:"]})
    batch = collator([VQA_SAMPLE])
    assert batch["input_ids"][0].tolist() == [IMAGE] * NUM_QUERY_TOKENS + [
        ID["Question:"], ID["what"], ID["is"], ID["this?"], ID["Answer:"], ID["</s>"]]
    assert batch["labels"][0].tolist() == [ID["red"], ID["</s>"]]
    assert batch["decoder_attention_mask"][0].tolist() == [1, 1]
    assert batch["qformer_input_ids"].shape == (1, 10)


def test_qformer_instruction_is_cut_at_its_max_length_keeping_sep():
    tokenizer = make_bert_tokenizer(extra_texts=["Question: what is this? Answer:"])
    inputs = qformer_instruction_inputs(tokenizer, ["Question: what is this? Answer:", "a photo of"], max_length=5)
    assert tokenizer.convert_ids_to_tokens(inputs["qformer_input_ids"][0]) == ["[CLS]", "question", ":", "what",
                                                                                "[SEP]"]
    assert inputs["qformer_attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 1]]


def test_template_draws_are_seeded_and_reproducible():
    samples = [dict(VQA_SAMPLE, image=caption_image(i)) for i in range(8)]

    def draws(seed):
        collator = word_collator(generator=torch.Generator().manual_seed(seed))
        return [collator([sample])["qformer_input_ids"][0].tolist() for sample in samples]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert len({tuple(ids) for ids in draws(3)}) > 1  # different templates within one run


def test_a_sample_without_its_field_is_skipped_and_an_unknown_task_refused():
    collator = word_collator(templates={"vqa": ["Question: {question} Answer:"]})
    batch = collator([VQA_SAMPLE, dict(VQA_SAMPLE, answer=None)])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped.counts["bad text"] == 1
    with pytest.raises(ValueError, match="task 'dance'"):
        collator([dict(VQA_SAMPLE, task="dance")])
    with pytest.raises(ValueError, match="no 'task' column"):
        collator([{k: v for k, v in VQA_SAMPLE.items() if k != "task"}])


def test_free_form_instructions_reach_the_qformer_through_the_same_helper():
    from modeling_blip2.training.collators import InstructionCollator

    qformer_tokenizer = make_bert_tokenizer(extra_texts=["Question: what is this? Answer:"])
    collator = InstructionCollator(
        Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        make_llm_tokenizer("opt", vocabulary="words"), NUM_QUERY_TOKENS, qformer_tokenizer=qformer_tokenizer,
    )
    batch = collator([{"image": caption_image(0), "prompt": "Question: what is this? Answer:", "response": "red"}])
    assert batch["labels"][0].tolist() == [X] * (NUM_QUERY_TOKENS + 6) + [ID["red"], ID["</s>"]]
    assert batch["qformer_input_ids"].tolist() == qformer_instruction_inputs(
        qformer_tokenizer, ["Question: what is this? Answer:"], 128)["qformer_input_ids"].tolist()


def test_instruction_annotations_load_from_json_lines_with_answer_lists_and_ocr_tokens(tmp_path):
    lines = [{"image": "a.png", "question": "What does the sign say?", "answer": ["stop", "stop", "go"],
              "ocr_tokens": ["STOP", "AHEAD"]},
             {"image": "b.png", "question": "Which street?"}]
    (tmp_path / "ocr.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = load_instruction_annotations(tmp_path / "ocr.jsonl", tmp_path / "images", "ocr_vqa")
    assert dataset[0] == {"image": str(tmp_path / "images" / "a.png"), "task": "ocr_vqa",
                          "question": "What does the sign say?", "answer": "stop", "ocr_tokens": "STOP, AHEAD"}
    assert dataset[1]["answer"] is None  # kept; the collator skips and counts it
    with pytest.raises(ValueError, match="task 'dance'"):
        load_instruction_annotations(tmp_path / "ocr.jsonl", tmp_path, "dance")


# ---- mixing, by counting -----------------------------------------------------------------------------------------

# Shares are counted over the first N_DRAWS rows; one share's standard deviation is at most 0.005 there, the tolerance
# is three of them.
N_DRAWS = 10_000
SHARE_TOLERANCE = 0.015


def sized_datasets(sizes):
    return {name: datasets.Dataset.from_dict({"source": [name] * size}) for name, size in sizes.items()}


def shares(mixture, n=N_DRAWS):
    counts = Counter(mixture.select(range(n))["source"])
    return {name: count / n for name, count in counts.items()}


def test_sqrt_size_mixing_draws_each_dataset_in_proportion_to_the_root_of_its_size():
    sizes = {"small": 400, "medium": 1600, "large": 6400}  # roots 20 : 40 : 80
    mixture = mix_datasets(sized_datasets(sizes), seed=0)
    expected = {"small": 1 / 7, "medium": 2 / 7, "large": 4 / 7}
    assert sqrt_size_weights(sizes) == pytest.approx(expected)
    observed = shares(mixture)
    assert all(abs(observed[name] - expected[name]) < SHARE_TOLERANCE for name in sizes), observed
    # "all_exhausted": every row of the largest dataset is drawn once the mixture ends
    assert len(mixture) > N_DRAWS and Counter(mixture["source"])["large"] >= 6400
    # the same seed, the same draws; another seed, others
    assert mix_datasets(sized_datasets(sizes), seed=0)["source"][:200] == mixture["source"][:200]
    assert mix_datasets(sized_datasets(sizes), seed=1)["source"][:200] != mixture["source"][:200]


def test_explicit_weights_are_honoured_and_missing_ones_default_to_the_root_of_the_size():
    sizes = {"small": 400, "medium": 1600, "large": 6400}
    observed = shares(mix_datasets(sized_datasets(sizes), weights={"small": 1, "medium": 1, "large": 2}, seed=0))
    expected = {"small": 0.25, "medium": 0.25, "large": 0.5}
    assert all(abs(observed[name] - expected[name]) < SHARE_TOLERANCE for name in sizes), observed
    # "small" weighs 40 instead of its root 20: 40 : 40 : 80
    assert sqrt_size_weights(sizes, {"small": 40}) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not among the datasets"):
        sqrt_size_weights(sizes, {"huge": 1})


def test_mixing_adds_the_task_column_and_aligns_the_other_columns():
    captions = datasets.Dataset.from_dict({"image": ["a.jpg"], "caption": ["a cat"]})
    questions = datasets.Dataset.from_dict({"image": ["b.jpg"], "question": ["what?"], "answer": ["cat"]})
    mixture = mix_datasets({"coco": captions, "vqa": questions}, tasks={"coco": "caption", "vqa": "vqa"}, seed=0)
    rows = {row["image"]: row for row in mixture}
    assert (rows["a.jpg"]["task"], rows["b.jpg"]["task"]) == ("caption", "vqa")
    assert rows["a.jpg"]["question"] is None and rows["b.jpg"]["caption"] is None


# ---- training through Blip2BridgeTrainer -------------------------------------------------------------------------


def write_instruction_data(root):
    """8 generated images, a COCO-style captions file (8 captions) and a VQA file (16 questions: 2 per image, whose
    answer is the last word of the image's caption)."""
    (root / "images").mkdir(parents=True)
    images, annotations, questions = [], [], []
    for index, caption in enumerate(CAPTIONS):
        caption_image(index).save(root / "images" / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png"})
        annotations.append({"id": index, "image_id": index, "caption": caption})
        for question in QUESTIONS:
            questions.append({"image": f"{index}.png", "question": question, "answer": [ANSWERS[index]] * 3})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "vqa.json").write_text(json.dumps(questions))
    return root / "captions.json", root / "vqa.json"


def all_template_texts():
    return [t.format(question=q, answer=a) for ts in INSTRUCTION_TEMPLATES.values() for t in ts
            for q in QUESTIONS for a in ANSWERS[:1]]


def instruction_aware_model(qformer_tokenizer, llm_tokenizer, seed=0, init_std=0.5):
    """The tiny stage-2 config (tests/tiny_models.py) with use_text_input=True, sized to the two tokenizers."""
    image_token_id = add_image_token(llm_tokenizer)
    config = tiny_stage2_config(
        "opt",
        qformer_config=dict(QFORMER_CONFIG, vocab_size=len(qformer_tokenizer), max_position_embeddings=64,
                            use_text_input=True),
        # init_std 0.5, as tests/trainer_helpers.py's OPT: the frozen LLM's output then depends on its soft prompt
        text_overrides=dict(vocab_size=len(llm_tokenizer), init_std=init_std, max_position_embeddings=160),
        image_token_id=image_token_id,
        initializer_range=0.2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Blip2BridgeForConditionalGeneration(config)


def word_level_opt_tokenizer(texts):
    """An OPT-like tokenizer (<s>=0, <pad>=1, </s>=2 the BOS and EOS, <unk>=3; "</s>" first in every text) whose
    vocabulary is every space-separated word of `texts`: prompts stay a few tokens long, so that the tiny frozen LLM
    still attends to the 4 image positions before them (a 300-piece BPE spells the templates in 30-70 tokens, and
    the tiny LLM's loss then hardly depends on the image)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: index for index, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tokenizers():
    texts = [*all_template_texts(), *(text.lower() for text in all_template_texts()), *CAPTIONS, *ANSWERS]
    return make_bert_tokenizer(extra_texts=texts), word_level_opt_tokenizer(texts)


def test_instruction_tuning_lowers_the_loss_keeps_frozen_weights_and_saves_a_model_that_generates(tmp_path):
    captions_file, vqa_file = write_instruction_data(tmp_path / "data")
    image_root = tmp_path / "data" / "images"
    mixture = mix_datasets(
        {"coco": load_instruction_annotations(captions_file, image_root, "caption"),
         "vqa": load_instruction_annotations(vqa_file, image_root, "vqa")},
        seed=0,
    )
    assert len(mixture) >= 24 and set(mixture["task"]) == {"caption", "vqa"}
    qformer_tokenizer, llm_tokenizer = tokenizers()
    model = instruction_aware_model(qformer_tokenizer, llm_tokenizer)
    image_processor = Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    collator = InstructionTuningCollator(
        image_processor, llm_tokenizer, NUM_QUERY_TOKENS, qformer_tokenizer=qformer_tokenizer,
        qformer_max_length=64, generator=torch.Generator().manual_seed(0),
    )
    frozen_before = frozen_state(model)
    assert any(n.startswith("vision_model.") for n in frozen_before)
    assert any(n.startswith("language_model.") for n in frozen_before)
    # A fixed evaluation batch: every distinct row of the mixture, templates drawn once with their own seed.
    evaluation_collator = InstructionTuningCollator(
        image_processor, llm_tokenizer, NUM_QUERY_TOKENS, qformer_tokenizer=qformer_tokenizer,
        qformer_max_length=64, generator=torch.Generator().manual_seed(1),
    )
    rows = list({(row["image"], row["question"]): row for row in mixture}.values())
    evaluation_batch = evaluation_collator(rows)
    assert evaluation_batch["input_ids"].shape[0] == 8 + 16

    def evaluation_loss():
        model.eval()
        with torch.no_grad():
            return model(**evaluation_batch).loss.item()

    loss_before = evaluation_loss()
    args = tiny_training_arguments(tmp_path / "run", max_steps=90, per_device_train_batch_size=8,
                                   learning_rate=5e-3, logging_steps=15)
    trainer = Blip2BridgeTrainer(model=model, args=args, train_dataset=mixture, data_collator=collator)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    loss_after = evaluation_loss()
    print(f"instruction tuning: logged losses {logged}; evaluation batch {loss_before:.3f} -> {loss_after:.3f}")
    # Measured: logged mean of steps 1-15 6.90 -> steps 76-90 6.08; evaluation batch 7.11 -> 6.34.
    assert logged[-1] < logged[0] - 0.4, logged
    assert loss_after < loss_before - 0.4, (loss_before, loss_after)
    for name, before in frozen_before.items():
        assert torch.equal(model.get_parameter(name), before), name

    trainer.save_model(tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(loaded, Blip2BridgeForConditionalGeneration)
    assert loaded.config.qformer_config.use_text_input
    instruction = "Question: what is in the picture? Short answer:"
    processor = Blip2BridgeProcessor(image_processor, llm_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    inputs = processor(images=[caption_image(0)], text=[instruction], return_tensors="pt")
    qformer_inputs = qformer_instruction_inputs(qformer_tokenizer, [instruction], max_length=64)
    with torch.no_grad():
        generated = loaded.generate(**inputs, **qformer_inputs, max_new_tokens=4, do_sample=False)
        other = qformer_instruction_inputs(qformer_tokenizer, ["A short image caption:"], max_length=64)
        features = loaded.get_image_features(inputs["pixel_values"], **qformer_inputs).pooler_output
        other_features = loaded.get_image_features(inputs["pixel_values"], **other).pooler_output
    assert generated.shape[1] > inputs["input_ids"].shape[1]  # the prompt and new tokens
    assert not torch.allclose(features, other_features)  # the queries read the instruction

    # The folder, saved with its processor (the Q-Former's tokenizer included), answers through the pipeline as
    # generate does with the instruction given to both the Q-Former and the LLM.
    Blip2BridgeProcessor(
        image_processor, llm_tokenizer, qformer_tokenizer=qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    ).save_pretrained(tmp_path / "saved")
    answer = pipeline("image-text-to-text", model=str(tmp_path / "saved"))(
        images=[caption_image(0)], text=[instruction], max_new_tokens=4, return_full_text=False
    )
    saved_processor = Blip2BridgeProcessor.from_pretrained(tmp_path / "saved")
    encoded = saved_processor(images=[caption_image(0)], text=[instruction], return_tensors="pt")
    assert "qformer_input_ids" in encoded
    with torch.no_grad():
        expected = loaded.generate(**encoded, max_new_tokens=4, do_sample=False)[:, encoded["input_ids"].shape[1] :]
    # The pipeline cuts the prompt off the decoded text, so a word boundary may keep its space.
    assert [output["generated_text"].strip() for output in answer] == [
        text.strip() for text in saved_processor.batch_decode(expected, skip_special_tokens=True)
    ]


# ---- blip2-bridge train ------------------------------------------------------------------------------------------


def test_instruction_data_entries_parse_from_flags_and_config_mappings(tmp_path):
    assert parse_instruction_data("task=vqa,file=data/vqa.json,weight=2", "images") == {
        "task": "vqa", "file": "data/vqa.json", "image_root": "images", "weight": 2.0, "name": "vqa"}
    assert parse_instruction_data({"task": "caption", "file": "c.json", "image_root": "coco", "name": "coco"},
                                  None)["image_root"] == "coco"
    for bad, message in [("task=vqa", "no \\['file'\\]"), ("task=dance,file=x", "task 'dance'"),
                         ("task=vqa,file=x,colour=red", "unknown keys"), ("vqa.json", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            parse_instruction_data(bad, "images")
    _, data_args, _ = parse_arguments(["--stage", "2", "--output_dir", str(tmp_path), "--image_root", "images",
                                       "--instruction_data", "task=caption,file=c.json", "task=vqa,file=v.json"])
    assert data_args.instruction_data == ["task=caption,file=c.json", "task=vqa,file=v.json"]


def test_blip2_bridge_train_mixes_instruction_data_from_a_config_file(tmp_path, capsys):
    captions_file, vqa_file = write_instruction_data(tmp_path / "data")
    qformer_tokenizer, llm_tokenizer = tokenizers()
    model_dir, output_dir = tmp_path / "instruct-stage2", tmp_path / "trained"
    initial = instruction_aware_model(qformer_tokenizer, llm_tokenizer)
    initial.save_pretrained(model_dir)
    llm_tokenizer.save_pretrained(model_dir)
    qformer_tokenizer.save_pretrained(model_dir / "qformer_tokenizer")
    Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(model_dir)
    config = {
        "stage": 2,
        "model_name_or_path": str(model_dir),
        "image_root": str(tmp_path / "data" / "images"),
        "instruction_data": [
            {"task": "caption", "file": str(captions_file), "name": "coco"},
            {"task": "vqa", "file": str(vqa_file), "weight": 4},
        ],
        "end_of_text": "</s>",  # the word-level tokenizer has no "\n", OPT's default end of text
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
    }
    (tmp_path / "instruct.yaml").write_text(yaml.safe_dump(config))
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "instruct.yaml")])
    mixture = load_train_dataset(data_args, seed=training_args.seed)
    # weights 4 (vqa) against sqrt(8) (coco): the first 24 rows hold about 14 questions
    assert Counter(mixture["task"][:24])["vqa"] > 12

    assert main(["train", str(tmp_path / "instruct.yaml")]) == 0
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert (summary["stage"], summary["steps"], summary["skipped_samples"]) == (2, 2, 0)
    assert summary["samples"] in (8, 12)  # 2 batches of 4, and the one the data loader may collate ahead
    trained = Blip2BridgeForConditionalGeneration.from_pretrained(output_dir)
    frozen = [n for n, _ in trained.named_parameters() if n.startswith(("language_model.", "vision_model."))]
    assert all(torch.equal(trained.get_parameter(n), initial.get_parameter(n)) for n in frozen)
    assert not torch.equal(trained.query_tokens, initial.query_tokens)
    # the Q-Former's tokenizer is saved beside the model, where the next run looks for it
    reloaded = AutoTokenizer.from_pretrained(output_dir / "qformer_tokenizer")
    assert reloaded.get_vocab() == qformer_tokenizer.get_vocab()


def test_templates_for_unknown_tasks_or_empty_template_lists_are_refused():
    with pytest.raises(ValueError, match=r"templates for \['riddles'\]"):
        word_collator(templates={"riddles": ["{question}"]})
    with pytest.raises(ValueError, match="templates for no template; expected non-empty lists"):
        word_collator(templates={"vqa": []})


def test_instruction_text_limit_defaults_to_lavis_max_txt_len_128_tokens():
    # LAVIS's InstructBLIP (blip2_vicuna_instruct.py, blip2_t5_instruct.py): max_txt_len=128.
    assert word_collator().max_length == 128
