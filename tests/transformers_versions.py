"""Names the tests use that differ between the transformers releases pyproject admits."""

from dataclasses import fields

from transformers import TrainingArguments

# transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names warn from then on).
ACTIVATION_CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {field.name for field in fields(TrainingArguments)}
    else "gradient_checkpointing"
)


def enable_activation_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
