"""Recipe fidelity: the settings where the original (salesforce/LAVIS) and transformers' defaults differ, each pinned
by number: stage-1 text length, gradient clipping, the command line's defaults, the per-epoch learning-rate schedule
and weight decay on `temp` (docs/training.md, "The recipe, and where the paper and the original code differ")."""

import math

import pytest
import torch
from transformers import AutoProcessor, TrainerCallback, TrainingArguments

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2 import Blip2BridgeTrainer
from modeling_blip2.processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from modeling_blip2.training import blip2_training_arguments
from modeling_blip2.training.arguments import Blip2BridgeTrainingArguments
from modeling_blip2.training.cli_train import parse_arguments
from modeling_blip2.training.trainer import decays, per_epoch_cosine_schedule
from tests.helpers import CAPTIONS, make_bert_tokenizer, make_llm_tokenizer
from tests.trainer_helpers import CaptionedImages, stage1_setup, tiny_stage2_model, tiny_training_arguments

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


# ---- item 2: stage-1 text length ------------------------------------------------------------------------------------

LONG_CAPTION = " ".join((" ".join(CAPTIONS * 2)).split()[:120])


def bert_base_like_tokenizer():
    tokenizer = make_bert_tokenizer()
    tokenizer.model_max_length = 512  # bert-base-uncased's
    return tokenizer


def test_stage1_caption_of_120_words_is_cut_to_32_tokens_though_the_tokenizer_allows_512():
    tokenizer = bert_base_like_tokenizer()
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer)

    assert len(LONG_CAPTION.split()) == 120 and len(tokenizer(LONG_CAPTION)["input_ids"]) > 120
    input_ids = processor(text=[LONG_CAPTION, "a cat"])["input_ids"]
    assert processor.max_text_length == 32
    assert input_ids.shape == (2, 32)
    assert input_ids[0, 0] == tokenizer.cls_token_id and input_ids[0, -1] == tokenizer.sep_token_id
    # a call's max_length still wins
    assert processor(text=LONG_CAPTION, max_length=40)["input_ids"].shape == (1, 40)


def test_stage1_text_length_is_overridable_and_saved_and_loaded_with_the_processor(tmp_path):
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), bert_base_like_tokenizer(), max_text_length=48)
    assert processor(text=LONG_CAPTION)["input_ids"].shape == (1, 48)
    processor.save_pretrained(tmp_path)

    for loaded in (Blip2BridgeProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert loaded.max_text_length == 48
        assert loaded(text=LONG_CAPTION)["input_ids"].shape == (1, 48)
    processor.max_text_length = 20
    assert processor(text=LONG_CAPTION)["input_ids"].shape == (1, 20)
    with pytest.raises(ValueError, match="max_text_length is 1; expected an integer of at least 2"):
        processor.max_text_length = 1


def test_stage2_keeps_the_language_model_limit_and_refuses_a_stage1_length():
    tokenizer = make_llm_tokenizer("opt")
    tokenizer.model_max_length = 512
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer, num_query_tokens=4)

    assert processor.max_text_length == 512
    # 4 placeholders + every token of the long prompt: nothing is cut at 32
    input_ids = processor(images=[torch.zeros(3, 8, 8).numpy()], text=LONG_CAPTION)["input_ids"]
    assert input_ids.shape[1] == 4 + len(tokenizer(LONG_CAPTION)["input_ids"]) > 100
    with pytest.raises(ValueError, match="max_text_length=32 with num_query_tokens set"):
        Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_llm_tokenizer("opt"), num_query_tokens=4,
                             max_text_length=32)


# ---- item 3: gradient clipping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_recipe_turns_off_the_trainers_gradient_clipping_as_the_original(tmp_path, stage):
    assert TrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 1.0
    assert blip2_training_arguments(stage, str(tmp_path)).max_grad_norm == 0.0
    assert blip2_training_arguments(stage, str(tmp_path), max_grad_norm=1.0).max_grad_norm == 1.0


@pytest.mark.parametrize("max_grad_norm, clipped_to", [(0.0, []), (1.0, [1.0, 1.0])])
def test_trainer_clips_only_when_max_grad_norm_is_positive(tmp_path, monkeypatch, max_grad_norm, clipped_to):
    model, collator = stage1_setup()
    args = tiny_training_arguments(tmp_path, max_steps=2, max_grad_norm=max_grad_norm)
    trainer = Blip2BridgeTrainer(model=model, args=args, train_dataset=CaptionedImages(8), data_collator=collator)
    max_norms = []
    clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", recording_clip)
    trainer.train()
    # transformers computes the logged norm with max_norm=inf (no clipping); a finite max_norm clips (norms here ~30)
    assert [norm for norm in max_norms if math.isfinite(norm)] == clipped_to
    assert all(entry["grad_norm"] > 1.0 for entry in trainer.state.log_history if "grad_norm" in entry)


# ---- item 4: the command line starts from the recipe ----------------------------------------------------------------


@pytest.mark.parametrize("stage, warmup_steps, max_steps, batch_size",
                         [(1, 5000, 250_000, 100), (2, 2000, 80_000, 64)])
def test_train_command_defaults_are_the_recipe_of_its_stage(stage, warmup_steps, max_steps, batch_size):
    _, _, args = parse_arguments(["--stage", str(stage), "--output_dir", "out"])
    assert (args.learning_rate, args.weight_decay, args.adam_beta1, args.adam_beta2) == (1e-4, 0.05, 0.9, 0.999)
    assert (args.warmup_steps, args.max_steps) == (warmup_steps, max_steps)
    assert args.per_device_train_batch_size == batch_size
    assert args.lr_scheduler_type.value == "cosine_warmup_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": 1e-6 / 1e-4}
    assert args.max_grad_norm == 0.0 and args.optim.value == "adamw_torch_fused"
    # the same values as the recipe's function
    recipe = blip2_training_arguments(stage, "out")
    for name in ("learning_rate", "weight_decay", "warmup_steps", "max_steps", "max_grad_norm", "lr_scheduler_kwargs",
                 "per_device_train_batch_size", "optim", "lr_scheduler_type"):
        assert getattr(args, name) == getattr(recipe, name), name


def test_train_command_config_file_and_flags_override_the_recipe(tmp_path):
    config_file = tmp_path / "stage2.yaml"
    config_file.write_text("stage: 2\noutput_dir: out\nlearning_rate: 2.0e-4\nwarmup_steps: 100\n")

    _, _, args = parse_arguments([str(config_file), "--max_steps", "7", "--max_grad_norm", "1.0"])
    assert (args.learning_rate, args.warmup_steps, args.max_steps, args.max_grad_norm) == (2e-4, 100, 7, 1.0)
    assert args.per_device_train_batch_size == 64  # stage 2's, from the config file's stage
    # the warm-up still starts at 1e-6 for the new peak
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": 1e-6 / 2e-4}
    # a flag's stage beats the file's
    _, _, args = parse_arguments([str(config_file), "--stage=1"])
    assert (args.per_device_train_batch_size, args.max_steps) == (100, 250_000)
    # asking for epochs drops the recipe's step count, unless steps are asked for too
    assert parse_arguments(["--output_dir", "o", "--num-train-epochs", "3"])[2].max_steps == -1
    assert parse_arguments(["--output_dir", "o", "--num_train_epochs", "3", "--max_steps", "9"])[2].max_steps == 9
    # the original's schedule and weight-decay rule, one flag each
    _, _, args = parse_arguments(["--output_dir", "o", "--cosine_decay_per_epoch", "--decay_scalar_parameters", "false"])
    assert (args.cosine_decay_per_epoch, args.decay_scalar_parameters) == (True, False)
    # a boolean whose --no_ complement shares its name takes the config file's value
    config_file.write_text("output_dir: out\nfrozen_modules_eval: false\n")
    assert parse_arguments([str(config_file)])[2].frozen_modules_eval is False


@pytest.mark.parametrize("stage, shown", [(1, 5000), (2, 2000)])
def test_train_command_help_shows_the_values_a_run_uses(capsys, stage, shown):
    with pytest.raises(SystemExit):
        parse_arguments(["--stage", str(stage), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    warmup = help_text[help_text.index("--warmup_steps WARMUP_STEPS, --warmup-steps"):][:400]
    assert "[BLIP-2 recipe: stage 1: 5000, stage 2: 2000] (default: {})".format(shown) in warmup
    assert "[BLIP-2 recipe: stage 1: 250000, stage 2: 80000]" in help_text
    assert "Set to 0 to disable. [BLIP-2 recipe] (default: 0.0)" in help_text


# ---- item 6: the original's per-epoch schedule ----------------------------------------------------------------------


def lavis_learning_rate(cur_epoch, cur_step, max_epoch, init_lr, min_lr, warmup_lr, warmup_steps):
    """lavis/common/optims.py (salesforce/LAVIS@57bee8d): LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step)."""
    if cur_epoch == 0:  # warmup_lr_schedule
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * cur_step / max(warmup_steps, 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * cur_epoch / max_epoch)) + min_lr  # cosine_lr_schedule


def test_per_epoch_schedule_equals_the_originals_formula_at_chosen_steps():
    # Stage 1's configuration: 10 epochs, here of 25k steps each, 5k warm-up steps from 1e-6 to 1e-4, floor 1e-5.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = per_epoch_cosine_schedule(optimizer, num_warmup_steps=5000, num_training_steps=250_000,
                                         steps_per_epoch=25_000, min_lr=1e-5, warmup_lr_rate=1e-6 / 1e-4)

    def learning_rate(step):
        return 1e-4 * schedule.lr_lambdas[0](step)

    for step in (0, 1, 2500, 4999, 5000, 24_999, 25_000, 37_500, 49_999, 125_000, 249_999):
        expected = lavis_learning_rate(step // 25_000, step % 25_000, 10, 1e-4, 1e-5, 1e-6, 5000)
        assert learning_rate(step) == pytest.approx(expected, rel=1e-12), step
    assert learning_rate(0) == pytest.approx(1e-6, rel=1e-12)
    assert learning_rate(2500) == pytest.approx(5.05e-5, rel=1e-12)
    assert learning_rate(5000) == learning_rate(24_999) == pytest.approx(1e-4, rel=1e-12)
    # epoch 1: 1e-5 + 9e-5 (1 + cos(pi / 10)) / 2, held for the whole epoch
    assert learning_rate(25_000) == learning_rate(49_999) == pytest.approx(9.779754323328192e-05, rel=1e-12)
    assert learning_rate(125_000) == pytest.approx(5.5e-5, rel=1e-12)  # epoch 5 of 10: the middle
    assert learning_rate(249_999) == pytest.approx(1.2202456766718194e-05, rel=1e-12)  # epoch 9: above the floor


class LearningRates(TrainerCallback):
    """The learning rate each optimiser step uses."""

    def __init__(self):
        self.values = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.values.append(optimizer.param_groups[0]["lr"])


def test_trainer_with_cosine_decay_per_epoch_steps_the_originals_schedule(tmp_path):
    # 8 samples in batches of 2: 4 steps per epoch, 3 epochs in 12 steps, warm-up over 3 steps.
    model, collator = stage1_setup()
    args = tiny_training_arguments(tmp_path, per_device_train_batch_size=2, max_steps=12, learning_rate=1e-3,
                                   warmup_steps=3, lr_scheduler_type="cosine_warmup_with_min_lr",
                                   lr_scheduler_kwargs={"min_lr": 1e-4, "warmup_lr_rate": 0.01},
                                   cosine_decay_per_epoch=True, logging_steps=100)
    recorder = LearningRates()
    trainer = Blip2BridgeTrainer(model=model, args=args, train_dataset=CaptionedImages(8), data_collator=collator,
                                 callbacks=[recorder])
    trainer.train()

    expected = [lavis_learning_rate(step // 4, step % 4, 3, 1e-3, 1e-4, 1e-5, 3) for step in range(12)]
    assert recorder.values == pytest.approx(expected, rel=1e-12)
    assert recorder.values[:4] == pytest.approx([1e-5, 3.4e-4, 6.7e-4, 1e-3], rel=1e-12)
    assert recorder.values[4] == recorder.values[7] == pytest.approx(1e-4 + 9e-4 * 0.75, rel=1e-12)


def test_cosine_decay_per_epoch_needs_the_recipes_schedule(tmp_path):
    assert blip2_training_arguments(1, str(tmp_path), cosine_decay_per_epoch=True).cosine_decay_per_epoch
    with pytest.raises(ValueError, match="cosine_decay_per_epoch with lr_scheduler_type='linear'"):
        Blip2BridgeTrainingArguments(output_dir=str(tmp_path), cosine_decay_per_epoch=True)


# ---- item 12: weight decay on temp ----------------------------------------------------------------------------------


def release_runner_decays(name, parameter):
    """lavis/runners/runner_base.py (salesforce/LAVIS@eb3189b), RunnerBase.optimizer: the no-decay test negated."""
    return not (parameter.ndim < 2 or "bias" in name or "ln" in name or "bn" in name)


@pytest.mark.parametrize("decay_scalar_parameters", [True, False])
def test_temp_decays_by_default_and_not_with_the_release_runners_rule(tmp_path, decay_scalar_parameters):
    model = stage1_setup()[0]
    args = blip2_training_arguments(1, str(tmp_path), decay_scalar_parameters=decay_scalar_parameters, use_cpu=True)
    decay_group, no_decay_group = Blip2BridgeTrainer(model=model, args=args).create_optimizer().param_groups
    temp = dict(model.named_parameters())["temp"]
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.05, 0.0)
    assert any(p is temp for p in decay_group["params"]) is decay_scalar_parameters
    assert any(p is temp for p in no_decay_group["params"]) is not decay_scalar_parameters


@pytest.mark.parametrize("make_model", [lambda: stage1_setup()[0], tiny_stage2_model], ids=["stage1", "stage2"])
def test_without_scalar_decay_the_rule_is_the_release_runners_on_every_trainable_parameter(make_model):
    trainable = [(name, p) for name, p in make_model().named_parameters() if p.requires_grad]
    assert [decays(name, p, decay_scalars=False) for name, p in trainable] == [
        release_runner_decays(name, p) for name, p in trainable
    ]
    # with scalar decay only the scalars differ: stage 1's temperature, held as a 1-element vector
    differing = [name for name, p in trainable if decays(name, p) != release_runner_decays(name, p)]
    assert differing == [name for name, p in trainable if p.numel() == 1]

