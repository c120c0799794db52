"""`blip2-bridge train` run again over an earlier run's output_dir: refused, or resumed from the newest complete
checkpoint (a half-written one skipped with a log line naming it), never a silent fresh start over its files.

One tiny stage-1 run (4 steps, checkpoints at steps 2 and 4) is trained once per module; each test works on a copy.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from modeling_blip2.cli import main
from modeling_blip2.training.cli_train import checkpoint_to_resume, parse_arguments
from modeling_blip2.training.trainer import latest_complete_checkpoint, resolve_checkpoint
from tests.data_files import write_coco_folder, write_tiny_model

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def train_arguments(root: Path, output_dir: Path, *flags: str) -> list[str]:
    return [
        "train", "--stage", "1", "--model_name_or_path", str(root / "tiny-model"),
        "--annotation_files", str(root / "coco" / "captions.json"), "--image_root", str(root / "coco" / "images"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--max_steps", "4",
        "--save_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--use_cpu", "--report_to", "none",
        *flags,
    ]  # fmt: skip


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight, optimiser, scheduler and RNG file under `folder`, by relative path (not
    training_args.bin, which holds the output_dir's path)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.suffix in WEIGHT_SUFFIXES and path.name != "training_args.bin"
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """The root holding tiny-model/, coco/ and out/, the output of a finished run. It ran with `--resume_from_checkpoint
    latest` in an empty output_dir, which starts from scratch."""
    root = tmp_path_factory.mktemp("first-run")
    write_tiny_model(root / "tiny-model")
    write_coco_folder(root / "coco")
    assert main(train_arguments(root, root / "out", "--resume_from_checkpoint", "latest")) == 0
    assert sorted(path.name for path in (root / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((root / "out" / "train_summary.json").read_text())["resumed_from"] is None
    return root


@pytest.fixture
def output_dir(first_run, tmp_path) -> Path:
    """A copy of the first run's output_dir, for a test to rerun or damage."""
    return Path(shutil.copytree(first_run / "out", tmp_path / "out"))


def test_rerun_without_resume_is_refused_in_one_line_and_leaves_the_files_untouched(first_run, output_dir, capsys):
    before = weight_hashes(output_dir)
    capsys.readouterr()
    assert main(train_arguments(first_run, output_dir)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"blip2-bridge train: error: {output_dir} holds an earlier run (checkpoint-2, checkpoint-4, "
        "train_summary.json); pass --resume_from_checkpoint latest to continue it from its newest complete checkpoint, "
        "or --overwrite_output_dir to train from scratch over it"
    ]
    assert weight_hashes(output_dir) == before
    assert len(before) == 9  # model.safetensors + 2 checkpoints x (model, optimizer, scheduler, rng_state)


def test_rerun_with_resume_latest_resumes_the_finished_run_and_leaves_its_weights_as_they_were(first_run, output_dir):
    before = weight_hashes(output_dir)
    assert main(train_arguments(first_run, output_dir, "--resume_from_checkpoint", "latest")) == 0
    assert weight_hashes(output_dir) == before
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == str((output_dir / "checkpoint-4").resolve())
    assert (summary["steps"], summary["samples"]) == (4, 0)  # nothing left to train


def test_resume_true_from_the_command_line_picks_the_newest_complete_checkpoint(first_run, output_dir):
    arguments = train_arguments(first_run, output_dir, "--resume_from_checkpoint", "True")
    _, _, training_args = parse_arguments(arguments[1:])  # after "train"
    assert checkpoint_to_resume(training_args) == str(output_dir / "checkpoint-4")


def cut_in_half(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "model.safetensors cut": (lambda folder: cut_in_half(folder / "model.safetensors"), "model.safetensors has"),
    "model.safetensors deleted": (lambda folder: (folder / "model.safetensors").unlink(), "no weights file"),
    "trainer_state.json deleted": (lambda folder: (folder / "trainer_state.json").unlink(), "no trainer_state.json"),
    "trainer_state.json cut": (lambda folder: cut_in_half(folder / "trainer_state.json"),
                               "trainer_state.json is not valid JSON"),
    "optimizer.pt cut": (lambda folder: cut_in_half(folder / "optimizer.pt"), "optimizer.pt is cut short"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_is_skipped_with_a_log_line_naming_it(output_dir, damage, caplog):
    damage_files, reason = DAMAGES[damage]
    damage_files(output_dir / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.training.trainer"):
        assert latest_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    [message] = caplog.messages
    assert message.startswith(f"skipping incomplete checkpoint {output_dir / 'checkpoint-4'}: {reason}")


def test_cut_safetensors_is_named_with_its_size_and_the_size_its_header_needs(output_dir):
    weights = output_dir / "checkpoint-4" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError) as error:
        resolve_checkpoint(str(output_dir / "checkpoint-4"), output_dir)
    assert str(error.value) == (
        f"checkpoint {output_dir / 'checkpoint-4'} is incomplete: model.safetensors has {size - 1} bytes; its header "
        f"places tensors up to byte {size}; pass an earlier checkpoint, or 'latest' for the newest complete one"
    )


def test_resume_from_a_truncated_newest_checkpoint_uses_the_previous_one_and_ends_bit_identical(
    first_run, output_dir, caplog
):
    cut_in_half(output_dir / "checkpoint-4" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.training.trainer"):
        assert main(train_arguments(first_run, output_dir, "--resume_from_checkpoint", "latest")) == 0
    assert any(message.startswith(f"skipping incomplete checkpoint {output_dir / 'checkpoint-4'}: model.safetensors")
               for message in caplog.messages)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == str((output_dir / "checkpoint-2").resolve())
    assert (summary["steps"], summary["samples"]) == (4, 7)  # steps 3 and 4: 8 captions, one with a corrupt image
    # model, optimiser, schedule, data order and RNG came back: the weights of the uninterrupted first run
    expected = weight_hashes(first_run / "out")
    resumed = weight_hashes(output_dir)
    for name in ("model.safetensors", "checkpoint-4/model.safetensors", "checkpoint-4/optimizer.pt"):
        assert resumed[name] == expected[name], name


def test_resume_from_a_checkpoint_without_its_rng_state_warns_naming_the_file(first_run, output_dir, caplog):
    shutil.rmtree(output_dir / "checkpoint-4")
    (output_dir / "checkpoint-2" / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.training.trainer"):
        assert main(train_arguments(first_run, output_dir, "--resume_from_checkpoint", "latest")) == 0
    assert f"{output_dir / 'checkpoint-2'} has no rng_state.pth: resuming with the current random state" in caplog.text
    assert json.loads((output_dir / "train_summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_resume_latest_with_no_complete_checkpoint_left_is_refused(first_run, output_dir, capsys):
    for folder in ("checkpoint-2", "checkpoint-4"):
        (output_dir / folder / "trainer_state.json").unlink()
    capsys.readouterr()
    assert main(train_arguments(first_run, output_dir, "--resume_from_checkpoint", "latest")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"blip2-bridge train: error: {output_dir} holds an earlier run (checkpoint-2, checkpoint-4, "
        "train_summary.json) but no complete checkpoint to resume; pass --overwrite_output_dir to train from scratch "
        "over it"
    )


def test_resume_true_without_any_checkpoint_is_an_error_and_latest_a_fresh_start(tmp_path):
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True but .* holds no complete checkpoint-\* folder"):
        resolve_checkpoint(True, tmp_path)
    assert resolve_checkpoint("latest", tmp_path) is None
    assert resolve_checkpoint(None, tmp_path) is None


def test_overwrite_output_dir_deletes_the_earlier_checkpoints_and_trains_from_scratch(first_run, output_dir):
    expected = weight_hashes(first_run / "out")
    arguments = train_arguments(first_run, output_dir, "--overwrite_output_dir")
    arguments[arguments.index("--max_steps") + 1] = "2"
    assert main(arguments) == 0
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    # the same seed from scratch: the first run's step-2 weights, now also the final model
    hashes = weight_hashes(output_dir)
    assert hashes["checkpoint-2/model.safetensors"] == expected["checkpoint-2/model.safetensors"]
    assert hashes["model.safetensors"] == expected["checkpoint-2/model.safetensors"]
