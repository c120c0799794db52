"""Blip2BridgeTrainer: what reaches the optimiser, the recipe's schedule, per-loss logging, frozen parts that stay
frozen (weights, eval mode, dtype), gradient checkpointing, PEFT, and tiny runs of both stages that learn."""

import logging
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import modeling_blip2
from modeling_blip2 import Blip2BridgeTrainer
from modeling_blip2.training import accelerate_config_path, blip2_training_arguments, build_trainer
from modeling_blip2.training.trainer import decays, training_stage, warn_if_fsdp_was_dropped
from tests.transformers_versions import ACTIVATION_CHECKPOINTING_ARGUMENT
from tests.trainer_helpers import (
    Stage2Captions,
    frozen_state,
    stage1_setup,
    stage1_trainer,
    stage2_collator,
    tiny_stage2_model,
    tiny_training_arguments,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


def record_training_mode(module: torch.nn.Module, modes: list):
    """Records `module.training` each time it runs forward."""
    return module.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---- the public name and the optimiser ------------------------------------------------------------------------------


def test_trainer_is_exported_as_spec_names_it():
    assert modeling_blip2.Blip2BridgeTrainer is Blip2BridgeTrainer
    assert "Blip2BridgeTrainer" in modeling_blip2.__all__
    assert issubclass(Blip2BridgeTrainer, __import__("transformers").Trainer)


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_holds_exactly_the_trainable_parameters_grouped_by_the_original_decay_rule(tmp_path, stage):
    model = stage1_setup()[0] if stage == 1 else tiny_stage2_model()
    trainer = Blip2BridgeTrainer(model=model, args=blip2_training_arguments(stage, str(tmp_path), report_to="none",
                                                                         use_cpu=True))
    optimizer = trainer.create_optimizer()
    assert training_stage(model) == stage

    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 and not in_optimizer & {id(p) for p in model.parameters() if not p.requires_grad}

    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    decay_group, no_decay_group = optimizer.param_groups
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.05, 0.0)
    assert decay_group["betas"] == (0.9, 0.999) and decay_group["lr"] == 1e-4
    decaying = {id(p) for p in decay_group["params"]}
    names = dict(model.named_parameters())
    # 1-d parameters and biases do not decay; the temperature (a scalar, held as a 1-element vector) and the 3-d query
    # tokens do.
    assert id(names["query_tokens"]) in decaying
    assert id(names["qformer.layer.0.crossattention.query.weight"]) in decaying
    assert id(names["qformer.layer.0.crossattention.query.bias"]) not in decaying
    assert id(names["qformer.layernorm.weight" if "qformer.layernorm.weight" in names else
                     "qformer.layer.0.attention.LayerNorm.weight"]) not in decaying
    if stage == 1:
        assert id(names["temp"]) in decaying and names["temp"].shape == (1,)
        assert id(names["vision_layernorm.weight"]) not in decaying
    else:
        assert id(names["language_projection.weight"]) in decaying
        assert id(names["language_projection.bias"]) not in decaying
    expected_no_decay = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not decays(n, p))
    assert sum(p.numel() for p in no_decay_group["params"]) == expected_no_decay > 0


@pytest.mark.parametrize("stage, warmup_steps, total_steps", [(1, 5000, 250_000), (2, 2000, 80_000)])
def test_recipe_warms_up_from_1e6_to_1e4_then_decays_by_cosine_to_1e5(tmp_path, stage, warmup_steps, total_steps):
    args = blip2_training_arguments(stage, str(tmp_path), report_to="none", use_cpu=True)
    assert (args.warmup_steps, args.max_steps) == (warmup_steps, total_steps)
    trainer = Blip2BridgeTrainer(model=stage1_setup()[0], args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    schedule = trainer.lr_scheduler.lr_lambdas[0]

    def learning_rate(step):
        return 1e-4 * schedule(step)

    assert learning_rate(0) == pytest.approx(1e-6, rel=1e-9)
    assert learning_rate(warmup_steps // 2) == pytest.approx(1e-6 + (1e-4 - 1e-6) * (warmup_steps // 2)
                                                            / (warmup_steps - 1), rel=1e-9)
    assert learning_rate(warmup_steps - 1) == pytest.approx(1e-4, rel=1e-9)
    middle = warmup_steps + (total_steps - warmup_steps) // 2 - 1
    assert learning_rate(middle) == pytest.approx((1e-4 + 1e-5) / 2, rel=1e-6)
    assert learning_rate(total_steps - 1) == pytest.approx(1e-5, rel=1e-9)
    # Overriding the peak keeps both ends of the recipe.
    faster = blip2_training_arguments(stage, str(tmp_path), learning_rate=2e-4, report_to="none", use_cpu=True)
    assert faster.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": 1e-6 / 2e-4}
    with pytest.raises(ValueError, match="stage=3"):
        blip2_training_arguments(3, str(tmp_path))


# ---- stage 1 ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_stage1_run_lowers_every_loss_and_leaves_the_frozen_encoder_untouched(tmp_path):
    model, collator = stage1_setup()
    frozen_before, trainable_before = frozen_state(model), trainable_state(model)
    vision_modes, qformer_modes = [], []
    record_training_mode(model.vision_model, vision_modes)
    record_training_mode(model.qformer, qformer_modes)

    trainer = stage1_trainer(tmp_path, model, collator, max_steps=30, per_device_train_batch_size=8,
                             logging_steps=5, learning_rate=5e-4)
    trainer.train()
    logs = training_logs(trainer)
    first, last = logs[0], logs[-1]
    # Averages of steps 1-5 against steps 26-30 (measured: ITC 2.62 -> 0.58, ITM 0.73 -> 0.26, ITG 4.38 -> 2.87).
    assert last["loss_itc"] < 0.4 * first["loss_itc"]
    assert last["loss_itm"] < 0.6 * first["loss_itm"]
    assert last["loss_itg"] < first["loss_itg"] - 1.0
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"] + entry["loss_itg"], rel=1e-5)

    for name, before in frozen_before.items():
        assert torch.equal(model.get_parameter(name), before), name
    changed = [name for name, before in trainable_before.items() if not torch.equal(model.get_parameter(name), before)]
    assert len(changed) == len(trainable_before)
    assert qformer_modes and all(qformer_modes) and not any(vision_modes)


def test_stage1_losses_are_logged_as_averages_over_the_logging_window(tmp_path):
    every_step = stage1_trainer(tmp_path / "a", max_steps=4, logging_steps=1)
    every_step.train()
    every_other = stage1_trainer(tmp_path / "b", max_steps=4, logging_steps=2)
    every_other.train()
    per_step, per_window = training_logs(every_step), training_logs(every_other)
    assert [entry["step"] for entry in per_window] == [2, 4]
    for window, entry in enumerate(per_window):
        steps = per_step[2 * window : 2 * window + 2]
        for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            assert entry[name] == pytest.approx((steps[0][name] + steps[1][name]) / 2, rel=1e-5), name
        assert len({steps[0]["loss_itg"], steps[1]["loss_itg"]}) == 2  # two different batches were averaged


def test_gradient_accumulation_logs_the_mean_over_micro_batches(tmp_path):
    # Two micro-batches of 4 per step against one batch of 4 per step: logged means are over micro-batches.
    accumulated = stage1_trainer(tmp_path / "a", max_steps=1, gradient_accumulation_steps=2, logging_steps=1)
    accumulated.train()
    single = stage1_trainer(tmp_path / "b", max_steps=2, logging_steps=2, learning_rate=0.0)
    single.train()
    (entry,) = training_logs(accumulated)
    (reference,) = training_logs(single)  # same two batches, no update between them
    for name in ("loss", "loss_itc", "loss_itg"):
        assert entry[name] == pytest.approx(reference[name], rel=1e-5), name


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    model, collator = stage1_setup()
    plain = stage1_trainer(tmp_path / "a", model, collator, max_steps=2)
    plain.train()
    checkpointed_model, _ = stage1_setup()
    checkpointed = stage1_trainer(tmp_path / "b", checkpointed_model, collator, max_steps=2,
                                  **{ACTIVATION_CHECKPOINTING_ARGUMENT: True})
    checkpointed.train()
    assert checkpointed_model.qformer.layer[0].gradient_checkpointing and not model.qformer.layer[0].gradient_checkpointing
    for first, second in zip(training_logs(plain), training_logs(checkpointed)):
        for name in ("loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm"):
            assert second[name] == pytest.approx(first[name], rel=1e-5, abs=1e-6), name
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(checkpointed_model.get_parameter(name), parameter, rtol=1e-5, atol=1e-6)


def test_frozen_dtype_casts_the_frozen_encoder_and_keeps_trainable_weights_in_float32(tmp_path):
    model, collator = stage1_setup()
    frozen_before = {name: value.to(torch.bfloat16) for name, value in frozen_state(model).items()}
    trainable_before = trainable_state(model)
    trainer = stage1_trainer(tmp_path, model, collator, max_steps=3, bf16=True, frozen_dtype="bfloat16")
    trainer.train()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32, name
            assert not torch.equal(parameter, trainable_before[name]), name
        else:
            assert parameter.dtype == torch.bfloat16, name
            assert torch.equal(parameter, frozen_before[name]), name
    assert all(math.isfinite(entry["loss"]) for entry in training_logs(trainer))
    with pytest.raises(ValueError, match="frozen_dtype='bf16'"):
        tiny_training_arguments(tmp_path, frozen_dtype="bf16")


# ---- stage 2 ----------------------------------------------------------------------------------------------------


def stage2_trainer(tmp_path, model, **overrides):
    args = tiny_training_arguments(tmp_path, **{"max_steps": 20, "per_device_train_batch_size": 8,
                                                "learning_rate": 2e-3, "logging_steps": 5, **overrides})
    return Blip2BridgeTrainer(model=model, args=args, train_dataset=Stage2Captions(), data_collator=stage2_collator)


def test_tiny_stage2_run_lowers_the_lm_loss_through_the_frozen_llm_kept_in_eval_mode(tmp_path):
    model = tiny_stage2_model()
    frozen_before, trainable_before = frozen_state(model), trainable_state(model)
    assert set(trainable_before) == {n for n, _ in model.named_parameters()
                                     if n.split(".")[0] in ("query_tokens", "qformer", "language_projection", "vision_layernorm")}
    llm_modes, qformer_modes = [], []
    record_training_mode(model.language_model, llm_modes)
    record_training_mode(model.qformer, qformer_modes)

    trainer = stage2_trainer(tmp_path, model)
    trainer.train()
    logs = training_logs(trainer)
    # Mean of steps 1-5 against steps 16-20 (measured: 6.06 -> 4.63).
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.8
    assert "loss_itc" not in logs[0]
    for name, before in frozen_before.items():
        assert torch.equal(model.get_parameter(name), before), name
    assert all(not torch.equal(model.get_parameter(n), before) for n, before in trainable_before.items())
    # The frozen OPT (dropout 0.1) ran in eval mode while the Q-Former trained.
    assert all(qformer_modes) and not any(llm_modes) and len(llm_modes) == 20


def test_frozen_llm_may_keep_its_dropout_as_the_original(tmp_path):
    model = tiny_stage2_model()
    llm_modes = []
    record_training_mode(model.language_model, llm_modes)
    stage2_trainer(tmp_path, model, max_steps=2, frozen_modules_eval=False).train()
    assert llm_modes == [True, True]


def test_lora_on_the_llm_trains_through_the_trainer_unchanged(tmp_path):
    model = tiny_stage2_model()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    # PEFT freezes everything but LoRA: the bridge (queries, Q-Former, projection) trains too.
    for bridge_part in (model.qformer, model.language_projection):
        bridge_part.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    llm_modes = []
    record_training_mode(model.language_model, llm_modes)

    trainer = stage2_trainer(tmp_path, peft_model)
    in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in peft_model.parameters() if p.requires_grad}
    trainer.train()
    logs = training_logs(trainer)
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5

    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert any("lora_B" in name for name in changed) and any(".qformer." in name for name in changed)
    assert all("lora_" in name or "language_model" not in name for name in changed)
    assert all(llm_modes)  # an LLM with trainable LoRA weights is not frozen: it trains in train mode


def test_build_trainer_uses_the_recipe_of_the_model_stage(tmp_path):
    trainer = build_trainer(tiny_stage2_model(), Stage2Captions(), stage2_collator, output_dir=str(tmp_path),
                            max_steps=10, report_to="none", use_cpu=True)
    assert (trainer.args.warmup_steps, trainer.args.max_steps, trainer.args.learning_rate) == (2000, 10, 1e-4)
    with pytest.raises(ValueError, match="output_dir"):
        build_trainer(tiny_stage2_model(), Stage2Captions(), stage2_collator)
    with pytest.raises(ValueError, match="holds no blip2-bridge model"):
        training_stage(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name, distributed_type", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                                    ("deepspeed_zero2", "DEEPSPEED")])
def test_shipped_accelerate_configs_load_with_accelerate(name, distributed_type):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(accelerate_config_path(name))
    assert (config.distributed_type.name, config.mixed_precision, config.num_machines) == (distributed_type, "bf16", 1)
    if name == "fsdp":  # a unit per Q-Former layer (tests/test_fsdp.py trains with them)
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Blip2BridgeQFormerLayer"
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
    with pytest.raises(ValueError, match="'zero3'"):
        accelerate_config_path("zero3")


@pytest.mark.parametrize(
    "asked, distributed_type, warns",
    [("true", "MULTI_CPU", True), ("true", "NO", True), ("true", "FSDP", False), ("false", "MULTI_CPU", False)],
)
def test_an_fsdp_config_that_accelerate_runs_without_fsdp_is_named(monkeypatch, caplog, asked, distributed_type,
                                                                      warns):
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", asked)
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.training.trainer"):
        warn_if_fsdp_was_dropped(DistributedType[distributed_type])
    if warns:
        assert f"asks for FSDP, but accelerate runs {DistributedType[distributed_type].value}" in caplog.text
    else:
        assert caplog.text == ""
