"""Training arguments of blip2-bridge, and the paper's recipe as a preset."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

# BLIP-2's optimisation recipe (LAVIS pre-training configs; the paper's section 3.4).
PEAK_LEARNING_RATE = 1e-4
WARMUP_START_LEARNING_RATE = 1e-6
MIN_LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.05
WARMUP_STEPS = {1: 5000, 2: 2000}
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
    """

    frozen_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the frozen vision encoder and LLM: bfloat16, float16 or float32 (default: as loaded)"},
    )
    frozen_modules_eval: bool = field(
        default=True,
        metadata={"help": "keep the frozen sub-modules (vision encoder, LLM) in eval mode while training"},
    )

    def __post_init__(self):
        if self.frozen_dtype is not None and self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype={self.frozen_dtype!r}; expected one of {sorted(FROZEN_DTYPES)} or None")
        super().__post_init__()


def blip2_training_arguments(stage: int, output_dir: str, **overrides) -> Blip2BridgeTrainingArguments:
    """BLIP-2's recipe for `stage` 1 or 2: AdamW (betas 0.9, 0.999, weight decay 0.05), peak learning rate 1e-4
    reached by a linear warm-up from 1e-6 (5k steps in stage 1, 2k in stage 2), then a cosine decay to 1e-5.

    Any `Blip2BridgeTrainingArguments` field can be overridden, e.g. `max_steps`, `per_device_train_batch_size`,
    `bf16=True, frozen_dtype="bfloat16"` on a GPU. The warm-up still starts at 1e-6 and the decay still ends at 1e-5
    when `learning_rate` is overridden.
    """
    if stage not in WARMUP_STEPS:
        raise ValueError(f"stage={stage!r}; expected 1 (representation learning) or 2 (generative learning)")
    recipe = dict(
        output_dir=output_dir,
        # One fused kernel for all parameters: on our CPU it takes a quarter of the time of the per-tensor loop.
        optim="adamw_torch_fused",
        learning_rate=PEAK_LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        warmup_steps=WARMUP_STEPS[stage],
        max_steps=TRAINING_STEPS[stage],
        # The collators read raw columns (images, captions) that the model's forward does not take.
        remove_unused_columns=False,
    )
    recipe.update(overrides)
    recipe.setdefault("lr_scheduler_type", "cosine_warmup_with_min_lr")
    if recipe["lr_scheduler_type"] == "cosine_warmup_with_min_lr":
        # transformers' schedule takes the warm-up start as a fraction of the peak.
        recipe.setdefault(
            "lr_scheduler_kwargs",
            {"min_lr": MIN_LEARNING_RATE, "warmup_lr_rate": WARMUP_START_LEARNING_RATE / recipe["learning_rate"]},
        )
    return Blip2BridgeTrainingArguments(**recipe)


def accelerate_config_path(name: str) -> Path:
    """The shipped `accelerate launch --config_file` for "ddp", "fsdp" or "deepspeed_zero2"."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"accelerate config {name!r}; expected one of {ACCELERATE_CONFIGS}")
    return Path(__file__).parent / "accelerate_configs" / f"{name}.yaml"


__all__ = ["Blip2BridgeTrainingArguments", "accelerate_config_path", "blip2_training_arguments"]
