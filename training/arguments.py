"""Training arguments of blip2-bridge, and the paper's recipe as a preset."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import SchedulerType, TrainingArguments

# BLIP-2's optimisation recipe (LAVIS pre-training configs; the paper's section 3.4).
PEAK_LEARNING_RATE = 1e-4
WARMUP_START_LEARNING_RATE = 1e-6
MIN_LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.05
WARMUP_STEPS = {1: 5000, 2: 2000}
# Per device, as LAVIS's `batch_size_train` (pretrain_stage1.yaml, pretrain_stage2.yaml).
BATCH_SIZES = {1: 100, 2: 64}
# The paper pre-trains 250k steps in stage 1 and 80k in stage 2.
TRAINING_STEPS = {1: 250_000, 2: 80_000}

ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed_zero2")

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Blip2BridgeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what BLIP-2's frozen encoder and LLM need.

    frozen_dtype: cast the frozen parameters (vision encoder, LLM) to this dtype ("bfloat16", "float16"); the
        trainable ones (queries, Q-Former, projections, heads, `temp`, LoRA) are kept in float32. Pair it with
        `bf16=True`/`fp16=True` so the Q-Former computes under autocast while its master weights stay float32.
    frozen_modules_eval: keep every frozen sub-module (no trainable parameter) in eval mode while training, so the
        frozen LLM's dropout is off. The vision encoder is kept in eval mode by the model itself.
    decay_scalar_parameters: apply weight decay to 0-d parameters (the ITC temperature `temp`), as LAVIS's
        `Blip2Base.get_optimizer_params` does for ViT-g models; False exempts them, as LAVIS's runner did when BLIP-2
        was released (`p.ndim < 2`). 1-d parameters and biases never decay (`training.trainer.decays`).
    cosine_decay_per_epoch: the original's schedule (LAVIS `LinearWarmupCosineLRScheduler`) instead of a per-step
        cosine: the linear warm-up runs within the first epoch, then the cosine steps once per epoch toward `min_lr`
        and holds within each epoch (see `training.trainer.per_epoch_cosine_schedule`). Applies to
        `lr_scheduler_type="cosine_warmup_with_min_lr"` (the recipe's) and needs a training set with a length.
    overwrite_output_dir: let `blip2-bridge train` start from scratch in an `output_dir` that holds an earlier run's
        checkpoints or model, deleting its checkpoint-* folders first (transformers 5 dropped TrainingArguments' field
        of this name). Without it such a run is refused unless it resumes (`resume_from_checkpoint`, e.g. "latest").
    """

    frozen_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the frozen vision encoder and LLM: bfloat16, float16 or float32 (default: as loaded)"},
    )
    frozen_modules_eval: bool = field(
        default=True,
        metadata={"help": "keep the frozen sub-modules (vision encoder, LLM) in eval mode while training"},
    )
    decay_scalar_parameters: bool = field(
        default=True,
        metadata={
            "help": "weight decay on 0-d parameters (the temperature temp), as LAVIS's Blip2Base.get_optimizer_params; "
            "false: exempt them, as the LAVIS runner of BLIP-2's release (p.ndim < 2)"
        },
    )
    cosine_decay_per_epoch: bool = field(
        default=False,
        metadata={
            "help": "the original's (LAVIS) schedule: warm-up within the first epoch, then the cosine of "
            "cosine_warmup_with_min_lr steps once per epoch instead of once per optimiser step"
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "blip2-bridge train: train from scratch over an earlier run in output_dir, deleting its "
            "checkpoint-* folders first (without it, such a run is refused unless --resume_from_checkpoint is given)"
        },
    )

    def __post_init__(self):
        if self.frozen_dtype is not None and self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype={self.frozen_dtype!r}; expected one of {sorted(FROZEN_DTYPES)} or None")
        super().__post_init__()
        if self.cosine_decay_per_epoch and self.lr_scheduler_type != SchedulerType.COSINE_WARMUP_WITH_MIN_LR:
            raise ValueError(
                f"cosine_decay_per_epoch with lr_scheduler_type={self.lr_scheduler_type.value!r}; expected "
                f"{SchedulerType.COSINE_WARMUP_WITH_MIN_LR.value!r}, the schedule whose cosine it steps per epoch"
            )


def recipe_values(stage: int) -> dict:
    """The `Blip2BridgeTrainingArguments` values of BLIP-2's recipe for `stage` 1 or 2: the optimiser, schedule and
    clipping of the original (salesforce/LAVIS `lavis/projects/blip2/train/pretrain_stage{1,2}.yaml` and its runner),
    the length of the paper (the original counts 10 epochs). `lr_scheduler_kwargs` is left out: it depends on the
    learning rate (`recipe_scheduler_kwargs`). `blip2_training_arguments` and `blip2-bridge train` start from these."""
    if stage not in WARMUP_STEPS:
        raise ValueError(f"stage={stage!r}; expected 1 (representation learning) or 2 (generative learning)")
    return dict(
        # One fused kernel for all parameters: on our CPU it takes a quarter of the time of the per-tensor loop.
        optim="adamw_torch_fused",
        learning_rate=PEAK_LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        # The original does not clip gradients (LAVIS `BaseTask.train_inner_loop`); 0 turns the Trainer's 1.0 off.
        max_grad_norm=0.0,
        lr_scheduler_type="cosine_warmup_with_min_lr",
        warmup_steps=WARMUP_STEPS[stage],
        max_steps=TRAINING_STEPS[stage],
        per_device_train_batch_size=BATCH_SIZES[stage],
        # The collators read raw columns (images, captions) that the model's forward does not take.
        remove_unused_columns=False,
    )


def recipe_scheduler_kwargs(learning_rate: float) -> dict:
    """`lr_scheduler_kwargs` of `cosine_warmup_with_min_lr` that start the warm-up at 1e-6 and end the decay at 1e-5
    whatever the peak `learning_rate` (transformers takes the warm-up start as a fraction of the peak)."""
    return {"min_lr": MIN_LEARNING_RATE, "warmup_lr_rate": WARMUP_START_LEARNING_RATE / learning_rate}


def blip2_training_arguments(stage: int, output_dir: str, **overrides) -> Blip2BridgeTrainingArguments:
    """BLIP-2's recipe for `stage` 1 or 2: AdamW (betas 0.9, 0.999, weight decay 0.05), peak learning rate 1e-4
    reached by a linear warm-up from 1e-6 (5k steps in stage 1, 2k in stage 2), then a cosine decay to 1e-5; no
    gradient clipping (`max_grad_norm=0`) and 100 (stage 1) / 64 (stage 2) samples per device, as the original.

    Any `Blip2BridgeTrainingArguments` field can be overridden, e.g. `max_steps`, `per_device_train_batch_size`,
    `bf16=True, frozen_dtype="bfloat16"` on a GPU, `cosine_decay_per_epoch=True` for the original's epoch-wise
    cosine. The warm-up still starts at 1e-6 and the decay still ends at 1e-5 when `learning_rate` is overridden.
    """
    recipe = {"output_dir": output_dir, **recipe_values(stage), **overrides}
    if recipe["lr_scheduler_type"] == "cosine_warmup_with_min_lr":
        recipe.setdefault("lr_scheduler_kwargs", recipe_scheduler_kwargs(recipe["learning_rate"]))
    return Blip2BridgeTrainingArguments(**recipe)


def accelerate_config_path(name: str) -> Path:
    """The shipped `accelerate launch --config_file` for "ddp", "fsdp" or "deepspeed_zero2"."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"accelerate config {name!r}; expected one of {ACCELERATE_CONFIGS}")
    return Path(__file__).parent / "accelerate_configs" / f"{name}.yaml"


__all__ = [
    "Blip2BridgeTrainingArguments",
    "accelerate_config_path",
    "blip2_training_arguments",
    "recipe_scheduler_kwargs",
    "recipe_values",
]
