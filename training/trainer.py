"""`Blip2BridgeTrainer`: transformers' Trainer for both BLIP-2 stages.

Stage 1 trains the queries, Q-Former, ITC projections, ITM/ITG heads and `temp` on loss_itc + loss_itm + loss_itg and
logs each loss at every logging step; stage 2 trains the queries, Q-Former and language projection through the frozen
LLM. Everything else is the Trainer's own: distributed data parallel, gradient accumulation, checkpoints, resume.
"""

import json
import logging
import math
import os
import re
import struct
import zipfile
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.trainer import FSDP_MODEL_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..modeling_vision import Blip2BridgeImageQueryModel
from .arguments import FROZEN_DTYPES, Blip2BridgeTrainingArguments, blip2_training_arguments

logger = logging.getLogger(__name__)

STAGE1_LOSSES = ("loss_itc", "loss_itm", "loss_itg")


def warn_if_fsdp_was_dropped(distributed_type: DistributedType) -> None:
    """accelerate (1.15) turns an accelerate config's FSDP on only for accelerator devices: on a CPU-only machine it
    trains with DDP instead, every process holding the whole model, and says nothing."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and distributed_type != DistributedType.FSDP:
        logger.warning(
            f"the accelerate config asks for FSDP, but accelerate runs {distributed_type.value} (it shards with FSDP "
            "only on accelerator devices, and this machine has none): every process holds the whole model"
        )


def decays(name: str, parameter: nn.Parameter, decay_scalars: bool = True) -> bool:
    """The weight-decay rule of LAVIS's `Blip2Base.get_optimizer_params` (ViT-g models): no decay on 1-d parameters
    (norms) and biases; everything else decays, the temperature `temp` and the 3-d query tokens included.
    `decay_scalars=False` also exempts scalars (`temp`), as LAVIS's runner did when BLIP-2 was released
    (`p.ndim < 2`); docs/training.md gives both sources. A scalar is a parameter of one element: LAVIS's 0-d `temp` is
    ours as a 1-element vector, which FSDP and DeepSpeed can shard."""
    if parameter.numel() == 1:
        return decay_scalars
    return parameter.ndim != 1 and not name.endswith("bias")


# An encoder layer's parameters in transformers' vision towers: `encoder.layers.N.` (BLIP-2's, CLIP, SigLIP),
# `encoder.layer.N.` or `layers.N.` (ViT, DINOv2, by release), possibly under a prefix; the first such part counts.
_TOWER_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


# The module names that FSDP, activation checkpointing and torch.compile put in front of a parameter's name.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_parameter_name(name: str) -> str:
    """A parameter's name without the wrappers' module names (FSDP, activation checkpointing, torch.compile)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def vision_layer_ids(vision_model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter of the tower numbered as LAVIS numbers the ViT's for its layer-wise learning-rate decay (the
    BEiT/EVA `get_num_layer`), and the tower's number of layers L: encoder layer k is k + 1, the parameters registered
    before the first layer (embeddings, CLIP's pre-layernorm) 0, those after the last (post-layernorm, head) L."""
    names = [name for name, _ in vision_model.named_parameters()]
    layer_of = {name: int(match.group(1)) for name in names if (match := _TOWER_LAYER.search(name))}
    if not layer_of:
        raise ValueError(
            f"no encoder layer among the parameters of {type(vision_model).__name__} (expected names with "
            "'layers.N.' or 'layer.N.'): vision_layer_decay cannot number its layers; use 1.0"
        )
    num_layers = max(layer_of.values()) + 1
    ids, after_layers = {}, False
    for name in names:
        if name in layer_of:
            ids[name], after_layers = layer_of[name] + 1, True
        else:
            ids[name] = num_layers if after_layers else 0
    return ids, num_layers


def parameter_groups(model: nn.Module, args: TrainingArguments, decay_parameter_names: list[str]) -> list[dict]:
    """The optimiser's parameter groups, trainable parameters only: the Trainer's two (`weight_decay`, and 0 for
    `decay_parameter_names`' complement) for everything outside the vision tower, then, when the tower trains, one
    group per tower layer and decay rule with the tower's own learning rate and weight decay, as LAVIS's
    `Blip2Base.get_optimizer_params`: layer id i (`vision_layer_ids`) learns at
    `vision_learning_rate * vision_layer_decay ** (L + 1 - i)`. The schedule then multiplies every group's rate alike.
    """
    decaying = set(decay_parameter_names)
    bridge = find_bridge_model(model)
    tower = {} if bridge is None else {id(p): name for name, p in bridge.vision_model.named_parameters()}
    rest = {True: [], False: []}
    tower_groups: dict[tuple[int, bool], dict] = {}
    layer_ids, num_layers = {}, 0
    decay_factor = getattr(args, "vision_layer_decay", 1.0)
    if tower and decay_factor != 1.0:
        layer_ids, num_layers = vision_layer_ids(bridge.vision_model)
    vision_lr = getattr(args, "vision_learning_rate", None)
    vision_lr = args.learning_rate if vision_lr is None else vision_lr
    vision_decay = getattr(args, "vision_weight_decay", None)
    vision_decay = args.weight_decay if vision_decay is None else vision_decay
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays_here = name in decaying
        if id(parameter) not in tower:
            rest[decays_here].append(parameter)
            continue
        # Without layer decay every tower parameter is one depth: layer_ids is empty and the exponent is 0.
        layer_id = layer_ids.get(tower[id(parameter)], num_layers + 1)
        group = tower_groups.setdefault((layer_id, decays_here), {
            "params": [],
            "weight_decay": vision_decay if decays_here else 0.0,
            "lr": vision_lr * decay_factor ** (num_layers + 1 - layer_id),
        })
        group["params"].append(parameter)
    return [
        {"params": rest[True], "weight_decay": args.weight_decay},
        {"params": rest[False], "weight_decay": 0.0},
        *(tower_groups[key] for key in sorted(tower_groups, key=lambda key: (key[0], not key[1]))),
    ]


def has_vision_settings(args: TrainingArguments) -> bool:
    """The arguments give the vision tower its own learning rate, weight decay or layer decay."""
    return (getattr(args, "vision_learning_rate", None) is not None
            or getattr(args, "vision_weight_decay", None) is not None
            or getattr(args, "vision_layer_decay", 1.0) != 1.0)


def per_epoch_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    steps_per_epoch: int,
    min_lr: float,
    warmup_lr_rate: float,
    last_epoch: int = -1,
) -> LambdaLR:
    """The original's learning-rate schedule (LAVIS `LinearWarmupCosineLRScheduler`, lavis/common/optims.py), with
    LAVIS's `cur_epoch` and `cur_step` read from the optimiser step `s`:

    - first epoch (`s < steps_per_epoch`): `min(peak, start + (peak - start) * s / num_warmup_steps)`, a linear
      warm-up from `start = warmup_lr_rate * peak` that holds the peak for the rest of the epoch;
    - epoch `e >= 1`: `min_lr + (peak - min_lr) * (1 + cos(pi * e / E)) / 2` for the whole epoch, `E` the number of
      epochs (the last epoch stays above `min_lr`, as in the original).

    `peak` is each parameter group's initial learning rate; `min_lr` and `warmup_lr_rate` are read as transformers'
    `cosine_warmup_with_min_lr` reads them, so the recipe's `lr_scheduler_kwargs` serve both schedules. As there, every
    group's rate is its initial rate times one factor: a group starting at r times `learning_rate` (a vision tower's,
    `parameter_groups`) warms up from r times the start and decays to r times `min_lr`.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch is {steps_per_epoch}; expected at least 1 optimiser step per epoch")
    lr_lambda = partial(
        _per_epoch_cosine_factor,
        num_warmup_steps=num_warmup_steps,
        steps_per_epoch=steps_per_epoch,
        num_epochs=math.ceil(num_training_steps / steps_per_epoch),
        min_lr_rate=min_lr / optimizer.defaults["lr"],
        warmup_lr_rate=warmup_lr_rate,
    )
    return LambdaLR(optimizer, lr_lambda, last_epoch)


def _per_epoch_cosine_factor(
    step: int, *, num_warmup_steps: int, steps_per_epoch: int, num_epochs: int, min_lr_rate: float,
    warmup_lr_rate: float,
) -> float:
    epoch = step // steps_per_epoch
    if epoch == 0:
        return min(1.0, warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(num_warmup_steps, 1))
    return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))


def find_bridge_model(model: nn.Module) -> nn.Module | None:
    """The blip2-bridge model inside `model` (itself, or wrapped by DDP, PEFT, ...); None if there is none."""
    return next((module for module in model.modules() if isinstance(module, Blip2BridgeImageQueryModel)), None)


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


# bitsandbytes' quantised weights (a 4-bit / 8-bit LLM): packed bytes, whatever dtype stores them
# (`bnb_4bit_quant_storage=torch.bfloat16` stores 4-bit weights as bfloat16); casting them would corrupt them.
QUANTIZED_PARAMETER_TYPES = ("Params4bit", "Int8Params")


def cast_for_training(model: nn.Module, frozen_dtype: torch.dtype) -> nn.Module:
    """Frozen floating-point parameters to `frozen_dtype`, trainable ones to float32 (the optimiser's master weights).
    Quantised weights (bitsandbytes' `Params4bit`, `Int8Params`) are left as they are."""
    for parameter in model.parameters():
        if not parameter.is_floating_point() or type(parameter).__name__ in QUANTIZED_PARAMETER_TYPES:
            continue
        dtype = torch.float32 if parameter.requires_grad else frozen_dtype
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


# ---- checkpoints ------------------------------------------------------------------------------------------------

# `resume_from_checkpoint="latest"`: the newest complete checkpoint in output_dir, or a fresh start if there is none.
LATEST_CHECKPOINT = "latest"
# The files `Trainer._load_from_checkpoint` loads weights from.
WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME,
                 ADAPTER_WEIGHTS_NAME)
# FSDP and DeepSpeed write their weights into sub-folders (pytorch_model_fsdp_0, global_step12).
WEIGHTS_FOLDER_PREFIXES = (FSDP_MODEL_NAME, "global_step")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, newest (largest N) first; none if `output_dir` does not exist."""
    if not os.path.isdir(output_dir):
        return []
    folders = [path for path in Path(output_dir).iterdir() if _CHECKPOINT_NAME.match(path.name) and path.is_dir()]
    return sorted(folders, key=lambda path: int(_CHECKPOINT_NAME.match(path.name).group(1)), reverse=True)


def incomplete_checkpoint_reason(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from, or None if it is complete.

    The Trainer (`Trainer._save_checkpoint`) writes the weights, then optimiser, scheduler and RNG states, and
    `trainer_state.json` last, so a save killed half-way leaves no (or a cut) `trainer_state.json`. Checked from the
    files alone, so checkpoints of any earlier run are judged alike: `trainer_state.json` parses, weights are present,
    every `.safetensors` file is as long as its header says, every `.pt`/`.pth`/`.bin` (torch.save's zip format) ends
    with its zip directory, every `.json` parses, and an index's shards all exist."""
    folder = Path(folder)
    state_file = folder / TRAINER_STATE_NAME
    if not state_file.is_file():
        return f"no {TRAINER_STATE_NAME} (the Trainer writes it last: the save did not finish)"
    names = {path.name for path in folder.iterdir()}
    has_weights = any(name in names for name in WEIGHTS_FILES) or any(
        name.startswith(WEIGHTS_FOLDER_PREFIXES) and (folder / name).is_dir() for name in names
    )
    if not has_weights:
        return f"no weights file (expected one of {', '.join(WEIGHTS_FILES)})"
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        problem = _file_problem(path)
        if problem is not None:
            return f"{path.name} {problem}"
        if path.name.endswith(".index.json"):
            shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
            missing = sorted(shards - names)
            if missing:
                return f"{path.name} lists missing shards {missing}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "is not valid JSON (cut short?)"
    elif path.suffix == ".safetensors":
        return _safetensors_problem(path)
    elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
        return "is cut short (no zip directory at its end, as torch.save writes)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes the header places."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"has {size} bytes; expected a safetensors header"
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            return f"has {size} bytes; its header alone needs {8 + header_length}"
        try:
            header = json.loads(file.read(header_length))
        except (ValueError, UnicodeDecodeError):
            return "has an unreadable safetensors header"
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    if size != expected:
        return f"has {size} bytes; its header places tensors up to byte {expected}"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in `output_dir` (see `incomplete_checkpoint_reason`); each newer, incomplete
    one is skipped with a warning naming it. None if there is no complete checkpoint."""
    for folder in checkpoint_folders(output_dir):
        reason = incomplete_checkpoint_reason(folder)
        if reason is None:
            return str(folder)
        logger.warning(f"skipping incomplete checkpoint {folder}: {reason}")
    return None


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder `Trainer.train(resume_from_checkpoint=...)` should load, None for a fresh start.

    - True: the newest complete checkpoint in `output_dir`; an error if there is none (the Trainer's meaning of True).
    - "latest": the same, but a fresh start if `output_dir` has no complete checkpoint, so that one command serves
      the first run and every restart after a crash.
    - a folder: itself, refused by name if incomplete.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True or resume_from_checkpoint == LATEST_CHECKPOINT:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None and resume_from_checkpoint is True:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint-* folder; pass a "
                f"checkpoint folder, or {LATEST_CHECKPOINT!r} to start from scratch when there is none"
            )
        if checkpoint is None:
            logger.info(f"no complete checkpoint in {output_dir}: training from scratch")
        else:
            logger.info(f"resuming from {checkpoint}")
        return checkpoint
    if os.path.isdir(resume_from_checkpoint):
        reason = incomplete_checkpoint_reason(resume_from_checkpoint)
        if reason is not None:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} is incomplete: {reason}; pass an earlier checkpoint, or "
                f"{LATEST_CHECKPOINT!r} for the newest complete one"
            )
    return resume_from_checkpoint


def rng_state_file(args: TrainingArguments) -> str:
    """The RNG-state file of this process in a checkpoint, as `Trainer._save_rng_state` names it."""
    return f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"


class Blip2BridgeTrainer(Trainer):
    """A `transformers.Trainer` for BLIP-2's two stages.

    - Only trainable parameters reach the optimiser, grouped as the original: no weight decay on 1-d parameters and
      biases (see `decays`). A vision tower that trains gets its own learning rate, weight decay and layer-wise
      learning-rate decay from `vision_learning_rate`, `vision_weight_decay`, `vision_layer_decay`
      (`parameter_groups`).
    - Stage 1 logs `loss_itc`, `loss_itm` and `loss_itg` next to `loss`, each averaged over the logging window (and
      over processes) as the Trainer averages `loss`.
    - With `Blip2BridgeTrainingArguments`: `frozen_dtype` casts the frozen encoder and LLM (trainable weights stay
      float32), `frozen_modules_eval` keeps them in eval mode while training, and `cosine_decay_per_epoch` selects
      the original's epoch-wise cosine (`per_epoch_cosine_schedule`).

    Plain `TrainingArguments` work too (no cast; frozen modules kept in eval mode). For the paper's hyper-parameters
    build the arguments with `blip2_training_arguments(stage, output_dir)`.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        frozen_dtype = getattr(args, "frozen_dtype", None)
        if model is not None and frozen_dtype is not None:
            cast_for_training(model, FROZEN_DTYPES[frozen_dtype])
        super().__init__(model, args, *pargs, **kwargs)
        warn_if_fsdp_was_dropped(self.accelerator.distributed_type)
        # Which parameter decays is decided on their shapes here, before any wrapping: FSDP (`use_orig_params`) shows
        # the optimiser flattened 1-d views, on which the rule would decay nothing.
        decay_scalars = getattr(self.args, "decay_scalar_parameters", True)
        self._decays_by_name = {} if model is None else {
            name: decays(name, parameter, decay_scalars) for name, parameter in model.named_parameters()
        }
        # The stage-1 model returns its loss without labels; this lets `evaluate` report eval_loss.
        self.can_return_loss = True
        self._stage1_loss_sums: dict[str, torch.Tensor] = {}
        self._stage1_loss_count = 0
        self._update_steps_per_epoch: int | None = None

    # ---- resume ---------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, with `resume_from_checkpoint` read by `resolve_checkpoint`: True and "latest" pick the
        newest complete checkpoint in `output_dir`, skipping (and logging) any a killed save left incomplete."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(checkpoint, *args, **kwargs)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # The Trainer only logs at info level when the file is missing; the run would then draw other ITM negatives,
        # dropout masks and augmentations than an uninterrupted one.
        if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, rng_state_file(self.args))):
            logger.warning(
                f"{checkpoint} has no {rng_state_file(self.args)}: resuming with the current random state, so random "
                "draws (ITM negatives, dropout, augmentation) differ from an uninterrupted run"
            )
        super()._load_rng_state(checkpoint)

    # ---- optimiser ------------------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The names (as `model` names them) of the parameters that decay (`decays`), judged on the shapes they had
        when the Trainer was built: a wrapped model's names lose their wrapper prefixes for the look-up."""
        decay_scalars = getattr(self.args, "decay_scalar_parameters", True)
        names = []
        for name, parameter in model.named_parameters():
            original = unwrapped_parameter_name(name)
            decided = self._decays_by_name.get(original)
            if decided is None:  # a parameter added after the Trainer was built (e.g. LoRA): its own shape decides
                decided = decays(original, parameter, decay_scalars)
            if decided:
                names.append(name)
        return names

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimiser, with the trainable vision tower's own groups (`parameter_groups`) when the
        arguments set `vision_learning_rate`, `vision_weight_decay` or `vision_layer_decay`."""
        opt_model = self.model if model is None else model
        if self.optimizer is None and has_vision_settings(self.args):
            bridge = find_bridge_model(opt_model)
            if bridge is None or bridge.vision_model_is_frozen:
                logger.warning(
                    "vision_learning_rate / vision_weight_decay / vision_layer_decay are set but the vision tower is "
                    "frozen: they apply to nothing (unfreeze it with model.vision_model.requires_grad_(True))"
                )
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                builds_own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
                if builds_own_groups or not (isinstance(optimizer_cls, type)
                                             and issubclass(optimizer_cls, torch.optim.Optimizer)):
                    raise ValueError(
                        f"optim={self.args.optim!r} builds its own parameter groups, so the vision tower's learning "
                        "rate, weight decay and layer decay cannot apply; expected an optimiser that takes parameter "
                        "groups (e.g. adamw_torch_fused)"
                    )
                groups = parameter_groups(opt_model, self.args, self.get_decay_parameter_names(opt_model))
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # The epoch length the per-epoch schedule needs; known only here, before the scheduler is created.
        self._update_steps_per_epoch = values[1] if has_length(dataloader) else None
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and getattr(self.args, "cosine_decay_per_epoch", False):
            if self._update_steps_per_epoch is None:
                raise ValueError(
                    "cosine_decay_per_epoch needs epochs: a training set with a length (streamed data has none); "
                    "train with the per-step cosine (cosine_decay_per_epoch=False) instead"
                )
            kwargs = self.args.lr_scheduler_kwargs or {}
            if set(kwargs) != {"min_lr", "warmup_lr_rate"}:
                raise ValueError(
                    f"cosine_decay_per_epoch with lr_scheduler_kwargs={kwargs}; expected min_lr and warmup_lr_rate "
                    "(blip2_training_arguments sets both)"
                )
            self.lr_scheduler = per_epoch_cosine_schedule(
                self.optimizer if optimizer is None else optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                steps_per_epoch=self._update_steps_per_epoch,
                **kwargs,
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

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
    "incomplete_checkpoint_reason",
    "parameter_groups",
    "latest_complete_checkpoint",
    "per_epoch_cosine_schedule",
    "resolve_checkpoint",
    "training_stage",
    "vision_layer_ids",
]
