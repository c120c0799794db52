"""The main paths raise no deprecation under the installed transformers: each would break at its next release.

Deprecations reach us two ways: `warnings` (DeprecationWarning, FutureWarning) and transformers' logger
("... is deprecated ..." through `logger.warning_once`, e.g. the cache rename of transformers 5.24). Both are recorded
here and must stay empty, except the few that third-party code raises on its own, listed with the reason.
"""

import contextlib
import logging
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import pipeline

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from tests.trainer_helpers import stage1_trainer
from tests.tiny_models import tiny_batch, tiny_model, tiny_stage2

DEPRECATION_WORDS = ("deprecat", "will be removed")
# Raised by a dependency's own code, whatever its caller does; not ours to silence.
THIRD_PARTY_DEPRECATIONS = {
    # peft's get_peft_model reads `model.is_gradient_checkpointing`, renamed by transformers 5.23.
    "`is_gradient_checkpointing` is deprecated",
}


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_deprecations():
    """Fails if the body raises a deprecation, as a warning or as a transformers log message."""
    handler = RecordingHandler()
    transformers.utils.logging.add_handler(handler)
    transformers.utils.logging.get_logger("transformers").warning_once.cache_clear()  # each message may come again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        transformers.utils.logging.remove_handler(handler)
    raised = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
              if issubclass(w.category, (DeprecationWarning, FutureWarning))]  # fmt: skip
    raised += [f"log: {message}" for message in handler.messages if any(w in message.lower() for w in DEPRECATION_WORDS)]
    raised = [message for message in raised if not any(known in message for known in THIRD_PARTY_DEPRECATIONS)]
    assert raised == [], "\n".join(raised)


def test_the_recorder_catches_both_kinds_of_deprecation():
    with pytest.raises(AssertionError, match="FutureWarning: old"):
        with no_deprecations():
            warnings.warn("old", FutureWarning)
    with pytest.raises(AssertionError, match="log: `x` is deprecated"):
        with no_deprecations():
            transformers.utils.logging.get_logger("transformers.models").warning("`x` is deprecated")


def test_stage1_training_step_and_captioning_raise_no_deprecation():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with no_deprecations():
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).loss.backward()
        model.eval().generate(pixel_values=pixel_values, max_length=12)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_loss_generation_and_pipelines_raise_no_deprecation(kind, tmp_path):
    model, processor = tiny_stage2(kind)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 26, 3), dtype=np.uint8))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with no_deprecations():
        inputs = processor(images=[image, image], text=["a photo of", ""])
        labels = inputs["input_ids"][:, -3:].clone() if kind == "t5" else inputs["input_ids"]
        model(**inputs, labels=labels).loss.backward()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3)
            model.generate(**inputs, max_new_tokens=3, num_beams=2)
        pipeline("image-text-to-text", model=str(tmp_path))(images=image, text="a photo of", max_new_tokens=3)
        pipeline("image-to-text", model=str(tmp_path), trust_remote_code=True)(image, max_new_tokens=3)
        get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj|q|v)"))


def test_trainer_steps_and_saves_without_deprecation(tmp_path):
    trainer = stage1_trainer(tmp_path, max_steps=2, save_steps=2)
    with no_deprecations():
        trainer.train()
