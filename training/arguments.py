"""Training arguments of blip2-bridge, and the original's recipes (pre-training, COCO fine-tuning) as presets."""

from dataclasses import dataclass, field, fields
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

# The COCO fine-tuning recipes, by the name of their LAVIS file (lavis/projects/blip2/train/<name>.yaml): both unfreeze
# the image tower (`freeze_vit: False`) at 364 px and share the optimiser and schedule; the batch differs. Retrieval's
# file also names a layer-wise learning-rate decay (`lr_layer_decay: 0.95`) that LAVIS's schedulers never apply (they
# set every group to one rate): the presets train the tower at one rate, as the original did; vision_layer_decay=0.95
# applies the decay the file names.
FINETUNE_LEARNING_RATE = 1e-5  # init_lr
FINETUNE_WARMUP_START_LEARNING_RATE = 1e-8  # warmup_lr
FINETUNE_MIN_LEARNING_RATE = 0.0  # min_lr
FINETUNE_WARMUP_STEPS = 1000
FINETUNE_EPOCHS = 5  # max_epoch
FINETUNE_RECIPES = {
    # caption_coco_ft.yaml: blip2_opt (stage 2, OPT-2.7b), prompt "a photo of ".
    "caption_coco_ft": dict(per_device_train_batch_size=16, vision_layer_decay=1.0),
    # retrieval_coco_ft.yaml: blip2 (stage 1).
    "retrieval_coco_ft": dict(per_device_train_batch_size=14, vision_layer_decay=1.0),
}
# The pre-training recipes under their LAVIS names too: recipe="pretrain_stage1" is stage=1.
PRETRAIN_RECIPES = {"pretrain_stage1": 1, "pretrain_stage2": 2}
RECIPES = (*PRETRAIN_RECIPES, *FINETUNE_RECIPES)

# transformers 5.23 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)

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
    decay_scalar_parameters: apply weight decay to scalar parameters (the ITC temperature `temp`), as LAVIS's
        `Blip2Base.get_optimizer_params` does for ViT-g models; False exempts them, as LAVIS's runner did when BLIP-2
        was released (`p.ndim < 2`). 1-d parameters and biases never decay (`training.trainer.decays`).
    cosine_decay_per_epoch: the original's schedule (LAVIS `LinearWarmupCosineLRScheduler`) instead of a per-step
        cosine: the linear warm-up runs within the first epoch, then the cosine steps once per epoch toward `min_lr`
        and holds within each epoch (see `training.trainer.per_epoch_cosine_schedule`). Applies to
        `lr_scheduler_type="cosine_warmup_with_min_lr"` (the recipe's) and needs a training set with a length.
    vision_learning_rate, vision_weight_decay: the peak learning rate and weight decay of the vision tower's parameters
        when the tower trains (`model.vision_model.requires_grad_(True)`); None: `learning_rate`, `weight_decay`. 1-d
        parameters and biases of the tower still do not decay. The schedule scales every group alike, so the tower's
        warm-up start and `min_lr` are scaled by its ratio to `learning_rate` too.
    vision_layer_decay: layer-wise learning-rate decay of the trainable tower, LAVIS's `lr_layer_decay`
        (`Blip2Base.get_optimizer_params`): with L encoder layers, layer k (0 first) learns at
        `vision_learning_rate * vision_layer_decay ** (L - k)`, the embeddings (and anything before the first layer)
        at `** (L + 1)`, the parameters after the last layer (post-layernorm, head) at `** 1`. 1.0: no decay
        (`training.trainer.vision_parameter_groups`).
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
            "help": "weight decay on scalars (the temperature temp), as LAVIS's Blip2Base.get_optimizer_params; "
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
    vision_learning_rate: float | None = field(
        default=None,
        metadata={"help": "peak learning rate of the vision tower when it trains (default: learning_rate)"},
    )
    vision_weight_decay: float | None = field(
        default=None,
        metadata={"help": "weight decay of the vision tower when it trains (default: weight_decay)"},
    )
    vision_layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "layer-wise learning-rate decay of the trained vision tower (LAVIS lr_layer_decay): each layer "
            "below the top learns this factor slower; 1.0: none"
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
        if not self.vision_layer_decay > 0:
            raise ValueError(f"vision_layer_decay={self.vision_layer_decay!r}; expected a factor > 0 (1.0: no decay)")
        for name in ("vision_learning_rate", "vision_weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value!r}; expected a value >= 0, or None for the rest of the model's")
        super().__post_init__()
        if self.cosine_decay_per_epoch and self.lr_scheduler_type != SchedulerType.COSINE_WARMUP_WITH_MIN_LR:
            raise ValueError(
                f"cosine_decay_per_epoch with lr_scheduler_type={self.lr_scheduler_type.value!r}; expected "
                f"{SchedulerType.COSINE_WARMUP_WITH_MIN_LR.value!r}, the schedule whose cosine it steps per epoch"
            )


def recipe_values(recipe: int | str) -> dict:
    """The `Blip2BridgeTrainingArguments` values of one of the original's recipes: pre-training `recipe` 1 or 2 (or
    "pretrain_stage1", "pretrain_stage2"), or COCO fine-tuning "caption_coco_ft" / "retrieval_coco_ft" (see
    `blip2_training_arguments`). `lr_scheduler_kwargs` is left out: it depends on the learning rate
    (`recipe_scheduler_kwargs`). `blip2_training_arguments` and `blip2-bridge train` start from these."""
    if recipe in FINETUNE_RECIPES:
        return dict(
            _optimiser_values(),
            learning_rate=FINETUNE_LEARNING_RATE,
            warmup_steps=FINETUNE_WARMUP_STEPS,
            num_train_epochs=FINETUNE_EPOCHS,
            # LinearWarmupCosineLRScheduler: warm-up within the first epoch, then one cosine step per epoch.
            cosine_decay_per_epoch=True,
            # use_grad_checkpoint: True (caption_coco_ft.yaml; lavis/configs/models/blip2/blip2_coco.yaml).
            **{CHECKPOINTING_ARGUMENT: True},
            **FINETUNE_RECIPES[recipe],
        )
    stage = PRETRAIN_RECIPES.get(recipe, recipe)
    if stage not in WARMUP_STEPS:
        given = f"stage={recipe!r}" if isinstance(recipe, int) else f"recipe={recipe!r}"
        raise ValueError(
            f"{given}; expected stage 1 (representation learning) or 2 (generative learning), or a recipe of {RECIPES}"
        )
    return dict(
        _optimiser_values(),
        learning_rate=PEAK_LEARNING_RATE,
        warmup_steps=WARMUP_STEPS[stage],
        max_steps=TRAINING_STEPS[stage],
        per_device_train_batch_size=BATCH_SIZES[stage],
    )


def _optimiser_values() -> dict:
    """What every recipe of the original shares (its runner's AdamW, no clipping, the warm-up + cosine schedule)."""
    return dict(
        # One fused kernel for all parameters: on our CPU it takes a quarter of the time of the per-tensor loop.
        optim="adamw_torch_fused",
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        # The original does not clip gradients (LAVIS `BaseTask.train_inner_loop`); 0 turns the Trainer's 1.0 off.
        max_grad_norm=0.0,
        lr_scheduler_type="cosine_warmup_with_min_lr",
        # The collators read raw columns (images, captions) that the model's forward does not take.
        remove_unused_columns=False,
    )


def recipe_scheduler_kwargs(learning_rate: float, recipe: int | str = 1) -> dict:
    """`lr_scheduler_kwargs` of `cosine_warmup_with_min_lr` that start the warm-up and end the decay where `recipe`
    does (pre-training: 1e-6 and 1e-5; COCO fine-tuning: 1e-8 and 0) whatever the peak `learning_rate` (transformers
    takes the warm-up start as a fraction of the peak)."""
    if recipe in FINETUNE_RECIPES:
        start, end = FINETUNE_WARMUP_START_LEARNING_RATE, FINETUNE_MIN_LEARNING_RATE
    else:
        start, end = WARMUP_START_LEARNING_RATE, MIN_LEARNING_RATE
    return {"min_lr": end, "warmup_lr_rate": start / learning_rate}


def blip2_training_arguments(
    stage: int | None = None, output_dir: str | None = None, *, recipe: str | None = None, **overrides
) -> Blip2BridgeTrainingArguments:
    """The original's recipe for pre-training `stage` 1 or 2, or the fine-tuning `recipe` named as its LAVIS file.

    Pre-training (`stage=1`, `stage=2`; or `recipe="pretrain_stage1"`, `"pretrain_stage2"`): AdamW (betas 0.9,
    0.999, weight decay 0.05), peak learning rate 1e-4 reached by a linear warm-up from 1e-6 (5k steps in stage 1, 2k
    in stage 2), then a cosine decay to 1e-5; no gradient clipping (`max_grad_norm=0`) and 100 (stage 1) / 64
    (stage 2) samples per device, as the original.

    COCO fine-tuning (lavis/projects/blip2/train/caption_coco_ft.yaml, retrieval_coco_ft.yaml), the image tower
    unfrozen at 364 px:
    - `recipe="caption_coco_ft"` (a stage-2 model) and `recipe="retrieval_coco_ft"` (a stage-1 model): the same AdamW
      with weight decay 0.05, peak 1e-5 after 1000 warm-up steps from 1e-8, then the original's per-epoch cosine to 0
      (`cosine_decay_per_epoch=True`) over 5 epochs, gradient checkpointing on; 16 (caption) / 14 (retrieval) samples
      per device; retrieval's file names a tower layer decay of 0.95 that the original never applied
      (`vision_layer_decay=0.95` applies it).
    - The recipe does not unfreeze the tower nor resize images, which are the model's and the processor's: call
      `model.vision_model.requires_grad_(True)`, and feed 364-px images (a processor with
      `size={"height": 364, "width": 364}`) to the model with `interpolate_pos_encoding=True` (a 224-px tower), or
      to a tower whose position table was resized to 364.

    Any `Blip2BridgeTrainingArguments` field can be overridden, e.g. `max_steps`, `per_device_train_batch_size`,
    `bf16=True, frozen_dtype="bfloat16"` on a GPU, `cosine_decay_per_epoch=True` for the original's epoch-wise
    cosine. The warm-up still starts, and the decay still ends, where the recipe's do when `learning_rate` is
    overridden.
    """
    if (stage is None) == (recipe is None):
        raise ValueError(f"stage={stage!r}, recipe={recipe!r}; pass exactly one: a stage (1, 2) or a recipe {RECIPES}")
    if output_dir is None:
        raise ValueError("blip2_training_arguments needs an output_dir")
    chosen = stage if recipe is None else recipe
    values = {"output_dir": output_dir, **recipe_values(chosen), **overrides}
    if values["lr_scheduler_type"] == "cosine_warmup_with_min_lr":
        values.setdefault("lr_scheduler_kwargs", recipe_scheduler_kwargs(values["learning_rate"], chosen))
    return Blip2BridgeTrainingArguments(**values)


def accelerate_config_path(name: str) -> Path:
    """The shipped `accelerate launch --config_file` for "ddp", "fsdp" or "deepspeed_zero2"."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"accelerate config {name!r}; expected one of {ACCELERATE_CONFIGS}")
    return Path(__file__).parent / "accelerate_configs" / f"{name}.yaml"


__all__ = [
    "RECIPES",
    "Blip2BridgeTrainingArguments",
    "accelerate_config_path",
    "blip2_training_arguments",
    "recipe_scheduler_kwargs",
    "recipe_values",
]
