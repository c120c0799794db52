"""`Blip2BridgeTrainer`: transformers' Trainer for both BLIP-2 stages.

Stage 1 trains the queries, Q-Former, ITC projections, ITM/ITG heads and `temp` on loss_itc + loss_itm + loss_itg and
logs each loss at every logging step; stage 2 trains the queries, Q-Former and language projection through the frozen
LLM. Everything else is the Trainer's own: distributed data parallel, gradient accumulation, checkpoints, resume.
"""

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..modeling_blip2_bridge import Blip2BridgeVisionMixin
from .arguments import FROZEN_DTYPES, Blip2BridgeTrainingArguments, blip2_training_arguments

STAGE1_LOSSES = ("loss_itc", "loss_itm", "loss_itg")


def decays(name: str, parameter: nn.Parameter) -> bool:
    """The original's weight-decay rule: no decay on 1-d parameters (norms) and biases; everything else decays,
    the 0-d temperature `temp` and the 3-d query tokens included."""
    return parameter.ndim != 1 and not name.endswith("bias")


def find_bridge_model(model: nn.Module) -> nn.Module | None:
    """The blip2-bridge model inside `model` (itself, or wrapped by DDP, PEFT, ...); None if there is none."""
    return next((module for module in model.modules() if isinstance(module, Blip2BridgeVisionMixin)), None)


def training_stage(model: nn.Module) -> int:
    """1 for a stage-1 model (no LLM), 2 for a stage-2 model."""
    bridge = find_bridge_model(model)
    if bridge is None:
        raise ValueError(f"{type(model).__name__} holds no blip2-bridge model; expected Blip2BridgeModel or "
                         "Blip2BridgeForConditionalGeneration (possibly wrapped, e.g. by PEFT)")
    return 1 if bridge.config.text_config is None else 2


def frozen_submodules(model: nn.Module) -> list[nn.Module]:
    """The bridge model's direct children that hold parameters and none trainable: the frozen vision encoder and
    LLM. An LLM carrying trainable LoRA weights is not frozen."""
    bridge = find_bridge_model(model)
    if bridge is None:
        return []
    frozen = []
    for module in bridge.children():
        parameters = list(module.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            frozen.append(module)
    return frozen


def cast_for_training(model: nn.Module, frozen_dtype: torch.dtype) -> nn.Module:
    """Frozen floating-point parameters to `frozen_dtype`, trainable ones to float32 (the optimiser's master weights)."""
    for parameter in model.parameters():
        if not parameter.is_floating_point():
            continue
        dtype = torch.float32 if parameter.requires_grad else frozen_dtype
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


class Blip2BridgeTrainer(Trainer):
    """A `transformers.Trainer` for BLIP-2's two stages.

    - Only trainable parameters reach the optimiser, grouped as the original: no weight decay on 1-d parameters and
      biases (see `decays`).
    - Stage 1 logs `loss_itc`, `loss_itm` and `loss_itg` next to `loss`, each averaged over the logging window (and
      over processes) as the Trainer averages `loss`.
    - With `Blip2BridgeTrainingArguments`: `frozen_dtype` casts the frozen encoder and LLM (trainable weights stay
      float32) and `frozen_modules_eval` keeps them in eval mode while training.

    Plain `TrainingArguments` work too (no cast; frozen modules kept in eval mode). For the paper's hyper-parameters
    build the arguments with `blip2_training_arguments(stage, output_dir)`.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        frozen_dtype = getattr(args, "frozen_dtype", None)
        if model is not None and frozen_dtype is not None:
            cast_for_training(model, FROZEN_DTYPES[frozen_dtype])
        super().__init__(model, args, *pargs, **kwargs)
        # The stage-1 model returns its loss without labels; this lets `evaluate` report eval_loss.
        self.can_return_loss = True
        self._stage1_loss_sums: dict[str, torch.Tensor] = {}
        self._stage1_loss_count = 0

    # ---- optimiser ------------------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, parameter in model.named_parameters() if decays(name, parameter)]

    # ---- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and getattr(self.args, "frozen_modules_eval", True):
            # Trainer calls model.train() before every step; the frozen encoder and LLM go back to eval mode.
            for module in frozen_submodules(model):
                module.eval()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and isinstance(outputs, dict):
            stage1_losses = {name: outputs[name] for name in STAGE1_LOSSES if outputs.get(name) is not None}
            if stage1_losses:
                for name, value in stage1_losses.items():
                    # Kept on the device: no host synchronisation until the next log.
                    self._stage1_loss_sums[name] = self._stage1_loss_sums.get(name, 0) + value.detach().float()
                self._stage1_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stage1_loss_count:
            names = sorted(self._stage1_loss_sums)
            means = torch.stack([self._stage1_loss_sums[name] for name in names]) / self._stage1_loss_count
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({name: value for name, value in zip(names, means.tolist())})
            self._stage1_loss_sums, self._stage1_loss_count = {}, 0
        super().log(logs, start_time)


def build_trainer(
    model: nn.Module,
    train_dataset,
    data_collator,
    output_dir: str | None = None,
    args: TrainingArguments | None = None,
    eval_dataset=None,
    callbacks=None,
    **argument_overrides,
) -> Blip2BridgeTrainer:
    """A `Blip2BridgeTrainer` for `model` on `train_dataset`: with `args` as given, or else the paper's recipe for
    the model's stage (`blip2_training_arguments`) written to `output_dir` with `argument_overrides` applied."""
    if args is None:
        if output_dir is None:
            raise ValueError("build_trainer needs args or an output_dir for the recipe's arguments")
        args = blip2_training_arguments(training_stage(model), output_dir, **argument_overrides)
    elif argument_overrides:
        raise ValueError(f"argument overrides {sorted(argument_overrides)} given with args; set them on args instead")
    return Blip2BridgeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        callbacks=callbacks,
    )


__all__ = [
    "Blip2BridgeTrainer",
    "Blip2BridgeTrainingArguments",
    "blip2_training_arguments",
    "build_trainer",
    "cast_for_training",
    "decays",
    "frozen_submodules",
    "training_stage",
]
