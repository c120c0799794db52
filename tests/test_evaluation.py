"""Benchmark runners on tiny random models and tiny datasets in the standard layouts: one prediction row per
question/image, metrics equal to the metric computed on those predictions, resumable shards."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_blip2 import (
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeImageProcessor,
    Blip2BridgeModel,
    Blip2BridgeProcessor,
    CaptionMetrics,
    RetrievalRecall,
    VQAAccuracy,
)
from modeling_blip2.cli import main
from modeling_blip2.evaluation import runner
from modeling_blip2.evaluation.data import load_task_data
from modeling_blip2.processing.text_cleaning import pre_caption
from modeling_blip2.evaluation.shards import read_jsonl
from modeling_blip2.retrieval import UNRANKED_SCORE, compute_retrieval_scores
from tests.data_files import ANSWERS, QUESTIONS, write_benchmark_data, write_image, write_json
from tests.helpers import CAPTIONS, make_bert_tokenizer, make_llm_tokenizer
from tests.tiny_models import NUM_QUERY_TOKENS, QFORMER_CONFIG, TEXT_CONFIGS, tiny_config, tiny_stage2_config



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_benchmark_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory) -> Path:
    """A tiny random OPT-based stage-2 model with its stage-2 processor."""
    tokenizer = make_llm_tokenizer("opt", extra_texts=[*QUESTIONS, "Question: Answer: a photo of"])
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": 28, "width": 28}), tokenizer,
                                     num_query_tokens=NUM_QUERY_TOKENS)
    config = tiny_stage2_config(
        "opt",
        qformer_config=dict(QFORMER_CONFIG, num_hidden_layers=2, use_text_input=False),
        text_overrides=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2BridgeForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():  # query tokens start at zero, norms at one: make every weight count
            parameter.add_(0.3 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("stage2")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory) -> Path:
    tokenizer = make_bert_tokenizer()
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": 28, "width": 28}), tokenizer)
    config = tiny_config()
    config.qformer_config.vocab_size = len(tokenizer)
    config.qformer_config.max_position_embeddings = 40
    config.qformer_config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("stage1")
    Blip2BridgeModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# Fixed answers, keyed by a word of each question: an untrained model answers nothing right (accuracy 0 whatever the
# rows hold), so the runner tests score these instead. Official VQA accuracy (mean over the 10 leave-one-out subsets
# of min(1, matching humans / 3)): "pink" (3 of 10 humans) 0.9, "3" 0, "yes" 1, "food" (4 of 10) 1, "lake" 1.
FIXED_ANSWERS = {"sofa": "pink", "dogs": "3", "raining": "yes", "plate": "food", "boat": "lake"}
FIXED_VQA_ACCURACY = 100 * (0.9 + 0 + 1 + 1 + 1) / 5


def with_fixed_generations(monkeypatch, generation_for):
    """Makes the runner's model answer `generation_for(prompt, pixel_values_row)` instead of generating: the runner's
    plumbing (rows, references, metric) is then checked on predictions whose metric is known and non-zero."""
    load = runner.load_model_and_processor

    def load_with_fixed_generations(*args, **kwargs):
        model, processor = load(*args, **kwargs)

        def generate(input_ids=None, pixel_values=None, **unused):
            prompts = processor.batch_decode(input_ids, skip_special_tokens=True)
            new_tokens = [processor.tokenizer(" " + generation_for(prompt, pixels), add_special_tokens=False)["input_ids"]
                          for prompt, pixels in zip(prompts, pixel_values)]
            width = max(map(len, new_tokens))
            pad = processor.tokenizer.pad_token_id
            new_tokens = torch.tensor([tokens + [pad] * (width - len(tokens)) for tokens in new_tokens])
            return torch.cat([input_ids, new_tokens], dim=1)  # a decoder-only LLM returns the prompt too

        model.generate = generate
        return model, processor

    monkeypatch.setattr(runner, "load_model_and_processor", load_with_fixed_generations)


def test_vqa_writes_one_row_per_question_and_the_metric_of_those_rows(stage2_dir, data_dir, tmp_path, monkeypatch):
    with_fixed_generations(monkeypatch, lambda prompt, _: next(a for w, a in FIXED_ANSWERS.items() if w in prompt))
    output = tmp_path / "vqav2"
    result = runner.evaluate("vqav2", stage2_dir, data_dir, output, batch_size=2, shard_size=2)
    rows = read_jsonl(output / "predictions.jsonl")
    assert [row["question_id"] for row in rows] == [1000, 1001, 1002, 1003, 1004]
    assert [row["answers"] for row in rows] == ANSWERS
    assert [row["prediction"] for row in rows] == ["pink", "3", "yes", "food", "lake"]
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["accuracy"] == result["accuracy"] == pytest.approx(FIXED_VQA_ACCURACY, abs=1e-6)
    assert saved["num_samples"] == 5 and saved["generation"]["prompt"] == "Question: {} Short answer:"


def test_vqa_prediction_is_the_models_beam_search_answer_to_lavis_opt_settings(stage2_dir, data_dir, tmp_path):
    """vqav2_zeroshot_opt_eval.yaml's prompt, Blip2OPT.predict_answers' length penalty 0, stop at "\n"."""
    runner.evaluate("vqav2", stage2_dir, data_dir, tmp_path, batch_size=3, shard_size=5, limit=3)
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    model, processor = runner.load_model_and_processor("vqav2", stage2_dir, "float32", "cpu")
    newline_id = processor.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    for row in rows:
        inputs = processor(images=Image.open(row["image"]).convert("RGB"),
                           text=f"Question: {row['question']} Short answer:", return_tensors="pt")
        generated = model.generate(**inputs, num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0,
                                   eos_token_id=newline_id)
        answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        assert row["prediction"] == answer.strip()


def test_paper_defaults_and_the_eos_stop_are_one_flag_away(stage2_dir, data_dir, tmp_path, capsys):
    assert main(["evaluate", "--task", "vqav2", "--model", str(stage2_dir), "--data-dir", str(data_dir),
                 "--output", str(tmp_path), "--limit", "1", "--defaults", "paper", "--end-of-text", ""]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["generation"] == dict(
        prompt="Question: {} Answer:", num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
        repetition_penalty=1.0, end_of_text=None,
    )


def test_captioning_writes_one_row_per_image_and_the_metric_of_those_rows(stage2_dir, data_dir, tmp_path, monkeypatch):
    annotations = json.loads((data_dir / "coco" / "annotations" / "coco_karpathy_test.json").read_text())
    processor = Blip2BridgeProcessor.from_pretrained(stage2_dir)
    image_pixels = [processor(images=Image.open(data_dir / "coco" / "images" / entry["image"]).convert("RGB"),
                              return_tensors="pt")["pixel_values"][0] for entry in annotations]
    # Each image is "captioned" with the first five words of its first reference: every metric is non-zero, and
    # pairing a prediction with another image's references changes it.
    fixed_captions = [" ".join(entry["caption"][0].split()[:5]) for entry in annotations]

    def caption_of(prompt, pixels):
        assert prompt.strip() == "a photo of"
        return fixed_captions[min(range(len(image_pixels)), key=lambda i: (image_pixels[i] - pixels).abs().sum())]

    with_fixed_generations(monkeypatch, caption_of)
    runner.evaluate("coco_caption", stage2_dir, data_dir, tmp_path, batch_size=2, shard_size=2,
                    generation={"max_new_tokens": 12})
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [row["image_id"] for row in rows] == [entry["image"] for entry in annotations]
    assert [row["references"] for row in rows] == [entry["caption"] for entry in annotations]
    assert [row["prediction"] for row in rows] == fixed_captions
    assert json.loads((tmp_path / "metrics.json").read_text())["generation"] == dict(
        prompt="a photo of", num_beams=5, max_new_tokens=12, min_new_tokens=8, length_penalty=1.0,
        repetition_penalty=1.0, end_of_text="\n",
    )
    references = [entry["caption"] for entry in annotations]  # from the annotations, not from the rows
    expected = CaptionMetrics().compute(predictions=fixed_captions, references=references)
    mismatched = CaptionMetrics().compute(predictions=fixed_captions, references=references[::-1])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("Bleu_4", "CIDEr", "ROUGE_L"):
        assert saved[name] == pytest.approx(expected[name], abs=1e-9), name
        assert expected[name] > 0 and abs(mismatched[name] - expected[name]) > 0.01, name


@pytest.fixture(scope="module")
def retrieval_run(stage1_dir, data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("flickr30k")
    runner.evaluate("flickr30k", stage1_dir, data_dir, output, batch_size=2, shard_size=2, k=3)
    return output


def rebuild_score_matrices(path: Path, num_images: int, num_texts: int):
    saved = load_file(str(path))
    scores_i2t = torch.full((num_images, num_texts), UNRANKED_SCORE).scatter_(1, saved["text_index"],
                                                                              saved["scores_i2t"])
    scores_t2i = torch.full((num_texts, num_images), UNRANKED_SCORE).scatter_(1, saved["image_index"],
                                                                              saved["scores_t2i"])
    return scores_i2t, scores_t2i


def test_retrieval_scores_are_the_rerankers_on_the_whole_test_set(retrieval_run, stage1_dir, data_dir):
    data = load_task_data("flickr30k", data_dir)
    scores_i2t, scores_t2i = rebuild_score_matrices(retrieval_run / "retrieval_scores.safetensors", 5, len(data.texts))
    # The sharded, resumable run gives the matrices of one compute_retrieval_scores call over the whole set.
    model = Blip2BridgeModel.from_pretrained(stage1_dir).eval()
    processor = Blip2BridgeProcessor.from_pretrained(stage1_dir)
    images = [Image.open(sample["image"]) for sample in data.samples]
    tokens = processor(text=[pre_caption(text) for text in data.texts], max_length=35)
    with torch.no_grad():
        image_embeds = model.get_image_embeds(processor(images=images)["pixel_values"])
    expected_i2t, expected_t2i = compute_retrieval_scores(
        model, image_embeds, tokens["input_ids"], tokens["attention_mask"], k=3
    )
    torch.testing.assert_close(scores_i2t, expected_i2t, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores_t2i, expected_t2i, rtol=0, atol=1e-5)

    rows = read_jsonl(retrieval_run / "predictions.jsonl")
    image_rows = [row for row in rows if row["direction"] == "image_to_text"]
    text_rows = [row for row in rows if row["direction"] == "text_to_image"]
    assert len(image_rows) == 5 and len(text_rows) == len(data.texts) == 12
    assert [row["ranked_text_ids"][:3] for row in image_rows] == expected_i2t.topk(3, dim=1).indices.tolist()
    assert [row["image_index"] for row in text_rows] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]


def test_retrieval_metrics_are_the_metric_of_the_saved_scores(retrieval_run, data_dir):
    data = load_task_data("flickr30k", data_dir)
    scores_i2t, scores_t2i = rebuild_score_matrices(retrieval_run / "retrieval_scores.safetensors", 5, len(data.texts))
    expected = RetrievalRecall().compute(
        scores_i2t=scores_i2t.numpy(), scores_t2i=scores_t2i.numpy(),
        img2txt=[sample["text_ids"] for sample in data.samples],
        txt2img=[image for image, sample in enumerate(data.samples) for _ in sample["text_ids"]],
    )
    saved = json.loads((retrieval_run / "metrics.json").read_text())
    for name, value in expected.items():
        assert saved[name] == pytest.approx(value, abs=0), name


def test_retrieval_saves_its_k_and_refuses_to_resume_with_another(retrieval_run, stage1_dir, data_dir, capsys):
    # k decides which pairs ITM re-ranks: the shards of a k=3 run are no k=4 run's.
    assert json.loads((retrieval_run / "metrics.json").read_text())["k"] == 3
    assert json.loads((retrieval_run / "evaluation_arguments.json").read_text())["k"] == 3
    saved = load_file(str(retrieval_run / "retrieval_scores.safetensors"))
    assert saved["text_index"].shape == (5, 3) and saved["image_index"].shape == (12, 3)
    arguments = ["evaluate", "--task", "flickr30k", "--model", str(stage1_dir), "--data-dir", str(data_dir),
                 "--output", str(retrieval_run), "--batch-size", "2", "--shard-size", "2"]
    assert main([*arguments, "--k", "4"]) == 1
    assert "other arguments (k differ)" in capsys.readouterr().err


def test_retrieval_texts_are_cut_to_35_tokens_as_lavis_does(stage1_dir, tmp_path, monkeypatch):
    # A 60-word caption: every text is tokenised once, padded to the longest, so all reach the model as 35 tokens,
    # the long one as its first 34 tokens and [SEP] (the processor alone would cut at 32, its max_txt_len).
    long_caption = " ".join(["a dog runs on the green grass"] * 10)
    for index in range(2):
        write_image(tmp_path / "data" / "flickr30k" / "images" / "flickr30k-images" / f"{index}.jpg", index)
    write_json(tmp_path / "data" / "flickr30k" / "annotations" / "flickr30k_test.json", [
        {"image": "flickr30k-images/0.jpg", "caption": [long_caption]},
        {"image": "flickr30k-images/1.jpg", "caption": [CAPTIONS[0]]},
    ])
    texts_seen = []
    get_text_features = Blip2BridgeModel.get_text_features

    def recording_get_text_features(self, input_ids, *args, **kwargs):
        texts_seen.append(input_ids.clone())
        return get_text_features(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Blip2BridgeModel, "get_text_features", recording_get_text_features)
    runner.evaluate("flickr30k", stage1_dir, tmp_path / "data", tmp_path / "run", batch_size=2, shard_size=2, k=1)
    input_ids = torch.cat(texts_seen)
    assert input_ids.shape == (2, runner.RETRIEVAL_MAX_TEXT_LENGTH) == (2, 35)
    tokenizer = Blip2BridgeProcessor.from_pretrained(stage1_dir).tokenizer
    full = tokenizer(pre_caption(long_caption))["input_ids"]
    assert len(full) > 35
    assert input_ids[0].tolist() == [*full[:34], tokenizer.sep_token_id]


def test_rerun_after_deleting_a_shard_recomputes_only_that_shard(stage2_dir, data_dir, tmp_path, monkeypatch):
    computed_questions = []
    generate_predictions = runner.generate_predictions

    def counting_generate_predictions(model, processor, task, samples, *args):
        computed_questions.append([sample["question_id"] for sample in samples])
        return generate_predictions(model, processor, task, samples, *args)

    monkeypatch.setattr(runner, "generate_predictions", counting_generate_predictions)
    arguments = ["evaluate", "--task", "vqav2", "--model", str(stage2_dir), "--data-dir", str(data_dir),
                 "--output", str(tmp_path), "--batch-size", "2", "--shard-size", "2", "--num-beams", "2"]
    assert main(arguments) == 0
    assert computed_questions == [[1000, 1001], [1002, 1003], [1004]]
    shards = sorted((tmp_path / "shards" / "predictions").glob("shard-*.jsonl"))
    assert [shard.name for shard in shards] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    first_predictions = (tmp_path / "predictions.jsonl").read_text()
    first_metrics = json.loads((tmp_path / "metrics.json").read_text())

    shards[1].unlink()
    computed_questions.clear()
    assert main(arguments) == 0
    assert computed_questions == [[1002, 1003]]
    assert (tmp_path / "predictions.jsonl").read_text() == first_predictions
    assert json.loads((tmp_path / "metrics.json").read_text()) == first_metrics

    computed_questions.clear()
    assert main(arguments) == 0  # everything on disk: nothing recomputed
    assert computed_questions == []


def test_resuming_with_other_arguments_is_refused(stage2_dir, data_dir, tmp_path, capsys):
    (tmp_path / "evaluation_arguments.json").write_text(json.dumps({"task": "vqav2", "limit": 3}))
    arguments = ["evaluate", "--task", "vqav2", "--model", str(stage2_dir), "--data-dir", str(data_dir),
                 "--output", str(tmp_path)]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "other arguments" in error and "limit" in error and "model" in error


def test_resuming_under_other_generation_defaults_is_refused(stage2_dir, data_dir, tmp_path, capsys):
    arguments = ["evaluate", "--task", "vqav2", "--model", str(stage2_dir), "--data-dir", str(data_dir),
                 "--output", str(tmp_path), "--limit", "1"]
    assert main(arguments) == 0
    assert main([*arguments, "--defaults", "paper"]) == 1
    assert "(generation differ)" in capsys.readouterr().err


def test_resuming_after_the_model_folder_changed_is_refused(stage2_dir, data_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(stage2_dir, model_dir)
    arguments = ["evaluate", "--task", "vqav2", "--model", str(model_dir), "--data-dir", str(data_dir),
                 "--output", str(tmp_path / "run"), "--limit", "1", "--num-beams", "1"]
    assert main(arguments) == 0
    assert main(arguments) == 0  # unchanged: the finished shards are reused
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    capsys.readouterr()
    assert main(arguments) == 1
    assert "model_files" in capsys.readouterr().err


def test_layouts_are_read_as_documented(data_dir):
    vqa = load_task_data("vqav2", data_dir)
    assert [sample["answers"] for sample in vqa.samples] == ANSWERS
    assert vqa.samples[1]["image"].endswith("coco/images/val2014/COCO_val2014_000000000007.jpg")
    flickr = load_task_data("flickr30k", data_dir)
    assert [sample["text_ids"] for sample in flickr.samples] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 11]]
    nocaps = load_task_data("nocaps", data_dir)
    assert nocaps.samples == [{"image_id": 0, "image": str(data_dir / "nocaps/images/0013ea2087020901.jpg"),
                               "references": CAPTIONS[:2]}]
    with pytest.raises(FileNotFoundError, match="gqa/annotations/testdev_balanced_questions.json"):
        load_task_data("gqa", data_dir)


@pytest.mark.parametrize(("task", "max_new_tokens", "min_new_tokens"), [("coco_caption", 30, 8), ("nocaps", 80, 10)])
def test_decoder_only_llms_other_than_opt_caption_with_the_documented_opt_settings(task, max_new_tokens, min_new_tokens):
    # LAVIS has no BLIP-2 config for them; docs/evaluation.md promises OPT's beams, lengths and penalties.
    from transformers import AutoConfig

    llama = AutoConfig.for_model("llama", vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=4)
    opt = AutoConfig.for_model(**TEXT_CONFIGS["opt"])
    expected = dict(prompt="a photo of", num_beams=5, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    length_penalty=1.0, repetition_penalty=1.0)
    for text_config in (llama, opt):
        settings = runner.generation_settings(task, text_config)
        assert {name: getattr(settings, name) for name in expected} == expected, text_config.model_type


def test_a_limited_retrieval_set_keeps_each_kept_images_captions_renumbered_in_order():
    from modeling_blip2.evaluation.data import TaskData

    data = TaskData(
        samples=[{"image": "a.png", "text_ids": [4, 0]}, {"image": "b.png", "text_ids": [1, 2, 3]}, {"image": "c.png", "text_ids": [5]}],
        texts=["t0", "t1", "t2", "t3", "t4", "t5"],
    )
    limited = runner.limit_task_data(data, 2)
    # The first image's captions become 0 and 1, the second's 2, 3 and 4; the third image and its caption are gone.
    assert [sample["text_ids"] for sample in limited.samples] == [[0, 1], [2, 3, 4]]
    assert limited.texts == ["t4", "t0", "t1", "t2", "t3"]
    assert [sample["image"] for sample in limited.samples] == ["a.png", "b.png"]
