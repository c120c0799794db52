"""Glue between the quickstart and transformers' Trainer: arguments, a quiet progress bar, the logged losses."""

from pathlib import Path

import torch
from transformers import ProgressCallback, Trainer, TrainingArguments


class ProgressBarWithoutLogs(ProgressCallback):
    """Trainer's progress bar without a printed dict per logging step; the losses go to the loss-curve plot."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train_with_progress_bar(trainer: Trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarWithoutLogs)
    trainer.train()


def trainer_arguments(output_dir: Path, steps: int, batch_size: int, learning_rate: float, seed: int):
    """Short CPU runs: linear warm-up over a tenth of the steps, then cosine decay; nothing saved mid-run."""
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
        report_to="none",
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
