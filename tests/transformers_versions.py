"""Names the tests use that differ between the transformers releases pyproject admits."""

from modeling_blip2.training.arguments import CHECKPOINTING_ARGUMENT

# transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names warn from then on).
ACTIVATION_CHECKPOINTING_ARGUMENT = CHECKPOINTING_ARGUMENT


def enable_activation_checkpointing(model, **checkpoint_kwargs):
    """checkpoint_kwargs go to torch.utils.checkpoint (e.g. use_reentrant), under either release's argument name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)
