"""Glue between the quickstart and transformers' Trainer: arguments, a labelled progress bar, the logged losses."""

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer, TrainingArguments


class LabelledProgressBar(ProgressCallback):
    """Trainer's progress bar named after its phase, with the latest logged losses beside it instead of a printed dict
    per logging step (the losses also go to the loss-curve plot)."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            self.training_bar.set_postfix(
                {name: f"{value:.3f}" for name, value in logs.items() if name.startswith("loss")}, refresh=False
            )


def train_with_progress_bar(trainer: Trainer, label: str) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LabelledProgressBar(label))
    trainer.train()


def trainer_arguments(
    output_dir: Path, steps: int, batch_size: int, learning_rate: float, seed: int, report_to: str = "none"
):
    """Short CPU runs: linear warm-up over a tenth of the steps, then cosine decay; nothing saved mid-run.

    output_dir: where the Trainer writes nothing but the logs of `report_to` (TensorBoard: output_dir/runs/...).
    """
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.05,
        logging_steps=max(1, steps // 40),
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def trainer_losses(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each logged loss (loss, and loss_itc/loss_itm/loss_itg where a trainer logs them) as (step, value) points."""
    curves = {}
    for entry in log_history:
        for name, value in entry.items():
            if name.startswith("loss") and "step" in entry:
                curves.setdefault(name, []).append((entry["step"], float(value)))
    return curves


class PrecomputedImageCollator:
    """A library collator's text encoding, with each sample's image as precomputed `image_embeds`.

    The image encoder is frozen, in eval mode and sees no augmentation here, so its features are the same in every
    step: computing them once instead of once per step and per epoch saves most of a CPU run. Samples carry an
    `image_index` into `image_embeds` (the features after the vision LayerNorm, `get_image_embeds`).
    """

    def __init__(self, collator, image_embeds: torch.Tensor):
        self.collator = collator
        self.image_embeds = image_embeds

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator.encode([self.collator.prepare_text(sample) for sample in samples]))
        batch["image_embeds"] = self.image_embeds[[sample["image_index"] for sample in samples]]
        return batch
