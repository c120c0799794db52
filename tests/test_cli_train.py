"""`blip2-bridge train`: a tiny stage-1 run from a generated COCO-style folder and a config file, end to end."""

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeModel
from modeling_blip2.cli import main
from modeling_blip2.training.cli_train import parse_arguments
from tests.data_files import write_coco_folder, write_shards, write_tiny_model
from tests.helpers import make_bert_tokenizer
from tests.tiny_models import tiny_config


@pytest.mark.slow
def test_stage1_training_from_a_config_file_writes_a_loadable_model_and_its_summary(tmp_path, capsys):
    model_dir, output_dir = tmp_path / "tiny-model", tmp_path / "trained"
    initial = write_tiny_model(model_dir)
    annotation_file = write_coco_folder(tmp_path / "coco")
    config_file = tmp_path / "stage1.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "stage": 1,
                "model_name_or_path": str(model_dir),
                "annotation_files": [str(annotation_file)],
                "image_root": str(tmp_path / "coco" / "images"),
                "use_image_ids": True,
                "output_dir": str(output_dir),
                "per_device_train_batch_size": 4,
                "max_steps": 100,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "save_strategy": "no",
                "use_cpu": True,
                "report_to": "none",
            }
        )
    )

    # the flag after the file overrides its max_steps
    assert main(["train", str(config_file), "--max_steps", "2"]) == 0

    summary = json.loads((output_dir / "train_summary.json").read_text())
    # 2 steps of 4 = one epoch of the 8 captions, one of which has the truncated image
    assert (summary["steps"], summary["samples"], summary["skipped_samples"]) == (2, 7, 1)
    assert summary["skipped_by_reason"]["corrupt image"] == 1
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert summary["final_losses"]["loss"] == [entry for entry in log_history if "loss" in entry][-1]["loss"]
    assert np.isfinite(summary["final_losses"]["loss"]) and summary["final_losses"]["loss"] > 0

    printed = capsys.readouterr().out
    assert "Stage-1 training done: 2 steps, 7 samples" in printed
    assert "skipped samples: 1 (1 corrupt image)" in printed
    assert f"final losses: loss {summary['final_losses']['loss']:.4f}" in printed
    assert str(output_dir.resolve()) in printed

    trained = AutoModel.from_pretrained(output_dir)
    assert isinstance(trained, Blip2BridgeModel)
    trained_weights, initial_weights = trained.state_dict(), initial.state_dict()
    # the frozen vision encoder is bit-identical; the Q-Former moved
    assert all(
        torch.equal(trained_weights[name], initial_weights[name])
        for name in initial_weights
        if name.startswith("vision_model.")
    )
    assert not torch.equal(trained_weights["query_tokens"], initial_weights["query_tokens"])
    assert Blip2BridgeImageProcessor.from_pretrained(output_dir).size == {"height": 28, "width": 28}


def test_config_file_values_are_defaults_that_flags_override(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"stage": 2, "prompt": "a photo of", "output_dir": "out", "learning_rate": 5e-5}))
    model_args, data_args, training_args = parse_arguments([str(config_file), "--learning_rate", "1e-4"])
    assert model_args.stage == 2
    assert data_args.prompt == "a photo of"
    assert training_args.learning_rate == 1e-4 and training_args.output_dir == "out"

    config_file.write_text(json.dumps({"stage": 1, "batch_size_typo": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['batch_size_typo'\]"):
        parse_arguments([str(config_file)])


def test_missing_data_source_is_a_one_line_error(tmp_path, capsys):
    model_dir = tmp_path / "tiny-model"
    write_tiny_model(model_dir)
    code = main(["train", "--stage", "1", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "o")])
    assert code == 1
    assert "give exactly one data source" in capsys.readouterr().err


def test_missing_model_folder_is_named_as_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "not-trained-yet"
    code = main(["train", "--stage", "1", "--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "o")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"blip2-bridge train: error: model folder {missing} does not exist (nor can it be a hub id: those read 'name' "
        "or 'namespace/name')"
    )


def test_stage2_folder_given_to_stage1_training_is_refused_before_loading(tmp_path, capsys):
    from tests.tiny_models import tiny_stage2

    model, _ = tiny_stage2("opt")
    model.save_pretrained(tmp_path / "stage2")
    capsys.readouterr()  # the save's progress bar
    code = main(["train", "--stage", "1", "--model_name_or_path", str(tmp_path / "stage2"), "--output_dir",
                 str(tmp_path / "o")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 1
    assert error.count("\n") == 1 and "holds a stage-2 model" in error and "--stage 2" in error


def test_model_folder_without_a_tokenizer_asks_for_one(tmp_path, capsys):
    model_dir = tmp_path / "converted"
    tiny_model_without_tokenizer = Blip2BridgeModel(tiny_config())
    tiny_model_without_tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    code = main(["train", "--stage", "1", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "o")])
    assert code == 1
    assert f"{model_dir} holds no tokenizer (a folder converted from LAVIS has none); pass --tokenizer_name_or_path" in (
        capsys.readouterr().err
    )


def test_a_bad_flag_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stage", "3"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.splitlines() == [
        "blip2-bridge train: error: argument --stage: invalid choice: 3 (choose from 1, 2) "
        "(`blip2-bridge train --help` lists every flag)"
    ]


@pytest.mark.slow
def test_stage2_training_keeps_the_llm_frozen_and_counts_samples(tmp_path, capsys):
    from modeling_blip2 import Blip2BridgeForConditionalGeneration
    from modeling_blip2.processing.processing_blip2_bridge import add_image_token
    from tests.helpers import make_llm_tokenizer
    from tests.tiny_models import QFORMER_CONFIG, tiny_stage2_config

    model_dir, output_dir = tmp_path / "tiny-stage2", tmp_path / "trained"
    tokenizer = make_llm_tokenizer("opt", vocabulary="words")
    config = tiny_stage2_config(
        "opt", qformer_config=dict(QFORMER_CONFIG, use_text_input=False), image_token_id=add_image_token(tokenizer)
    )
    torch.manual_seed(0)
    initial = Blip2BridgeForConditionalGeneration(config)
    initial.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    Blip2BridgeImageProcessor(size={"height": 28, "width": 28}).save_pretrained(model_dir)
    annotation_file = write_coco_folder(tmp_path / "coco")

    arguments = [
        "train",
        "--stage",
        "2",
        "--model_name_or_path",
        str(model_dir),
        "--annotation_files",
        str(annotation_file),
        "--image_root",
        str(tmp_path / "coco" / "images"),
        "--prompt",
        "a photo of",
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--report_to",
        "none",
    ]
    assert main(arguments) == 0
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert (summary["stage"], summary["steps"], summary["samples"], summary["skipped_samples"]) == (2, 2, 7, 1)
    assert "Stage-2 training done: 2 steps, 7 samples" in capsys.readouterr().out

    trained = Blip2BridgeForConditionalGeneration.from_pretrained(output_dir).state_dict()
    frozen = [name for name in trained if name.startswith(("language_model.", "vision_model."))]
    assert frozen and all(torch.equal(trained[name], initial.state_dict()[name]) for name in frozen)
    assert not torch.equal(trained["language_projection.weight"], initial.state_dict()["language_projection.weight"])


@pytest.mark.slow
def test_stage2_training_from_a_stage1_model_and_a_language_model(tmp_path, capsys):
    from transformers import AutoProcessor

    from modeling_blip2 import Blip2BridgeForConditionalGeneration
    from tests.helpers import make_llm_tokenizer
    from tests.tiny_models import tiny_llm

    stage1_dir, llm_dir, output_dir = tmp_path / "stage1", tmp_path / "llm", tmp_path / "trained"
    stage1 = write_tiny_model(stage1_dir)
    language_model = tiny_llm("opt")
    language_model.save_pretrained(llm_dir)
    make_llm_tokenizer("opt").save_pretrained(llm_dir)  # without "<image>": the builder adds it
    annotation_file = write_coco_folder(tmp_path / "coco")

    arguments = ["train", "--stage", "2", "--model_name_or_path", str(stage1_dir), "--language_model_name_or_path",
                 str(llm_dir), "--annotation_files", str(annotation_file), "--image_root",
                 str(tmp_path / "coco" / "images"), "--output_dir", str(output_dir), "--per_device_train_batch_size",
                 "4", "--max_steps", "2", "--learning_rate", "1e-3", "--save_strategy", "no", "--use_cpu",
                 "--report_to", "none"]
    assert main(arguments) == 0
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert (summary["stage"], summary["steps"], summary["samples"], summary["skipped_samples"]) == (2, 2, 7, 1)

    trained = Blip2BridgeForConditionalGeneration.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == trained.config.image_token_id
    assert trained.config.num_query_tokens == stage1.config.num_query_tokens
    weights, stage1_weights = trained.state_dict(), stage1.state_dict()
    # The frozen parts are the stage-1 vision side and the LLM as saved; the queries moved.
    assert torch.equal(weights["vision_model.embeddings.patch_embedding.weight"],
                       stage1_weights["vision_model.embeddings.patch_embedding.weight"])
    # The tiny LLM's vocabulary has room for "<image>", so even its embeddings stay as saved.
    llm_weights = language_model.state_dict()
    assert all(torch.equal(weights[f"language_model.{name}"], tensor) for name, tensor in llm_weights.items())
    assert not torch.equal(weights["query_tokens"], stage1_weights["query_tokens"])


@pytest.mark.slow
def test_stage1_training_streams_webdataset_shards(tmp_path, capsys):

    model_dir, output_dir = tmp_path / "tiny-model", tmp_path / "trained"
    write_tiny_model(model_dir)
    shards = write_shards(tmp_path)
    arguments = [
        "train", "--stage", "1", "--model_name_or_path", str(model_dir), "--shards", *shards,
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
    ]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads((output_dir / "train_summary.json").read_text())
    # the eight samples in order, four per batch: (2 readable, 2 not), (3 readable, 1 not)
    assert (summary["steps"], summary["samples"], summary["skipped_samples"]) == (2, 5, 3)
    assert summary["skipped_by_reason"] == {"missing file": 0, "corrupt image": 2, "empty image": 1, "bad text": 0}
    assert isinstance(AutoModel.from_pretrained(output_dir), Blip2BridgeModel)


def test_random_augment_flag_adds_blips_random_augment_after_crop_and_flip():
    from modeling_blip2.training.augmentation import RandomAugment
    from modeling_blip2.training.cli_train import make_collator

    model, tokenizer = Blip2BridgeModel(tiny_config()), make_bert_tokenizer()
    for flags, expected in (([], type(None)), (["--random_augment"], RandomAugment)):
        model_args, data_args, _ = parse_arguments(["--output_dir", "unused", "--image_folder", "unused", *flags])
        collator, _ = make_collator(model_args, data_args, model, tokenizer, Blip2BridgeImageProcessor(), None)
        random_augment = collator.image_transform.random_augment
        assert type(random_augment) is expected
        if random_augment is not None:
            assert (random_augment.num_ops, random_augment.magnitude) == (2, 5)
