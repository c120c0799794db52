"""The recipe where the models carry it: stage-2 losses that add up across gradient accumulation and processes to
the token mean of the full batch, stage 1's mean over micro-batches (as the original), and the original's caption
length limits of the Q-Former."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from transformers import TrainerCallback

import modeling_blip2.modeling_stage1 as stage1_module
from modeling_blip2 import Blip2BridgeForConditionalGeneration, Blip2BridgeTrainer
from tests.helpers import free_port, hardest_negatives
from tests.tiny_models import IMAGE_TOKEN_ID, NUM_QUERY_TOKENS, QFORMER_CONFIG, TEXT_CONFIGS
from tests.tiny_models import SEP_ID, tiny_batch, tiny_model, tiny_stage2_config
from tests.trainer_helpers import CaptionedImages, stage1_setup, tiny_training_arguments

NUM_SAMPLES = 8
# Target lengths that differ within every micro-batch of two and between micro-batches: the mean of the micro-batch
# token means is then far from the token mean of the full batch.
TARGET_LENGTHS = (1, 7, 2, 2, 6, 3, 1, 5)
PROMPT_LENGTHS = (3, 1, 2, 4, 1, 3, 2, 1)


def stage2_model(kind: str) -> Blip2BridgeForConditionalGeneration:
    config = tiny_stage2_config(
        kind,
        qformer_config={
            **QFORMER_CONFIG, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "use_text_input": False,
        },  # fmt: skip
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return Blip2BridgeForConditionalGeneration(config)


class PromptsAndTargets(Dataset):
    """Images with a prompt and a target of its own length, as token ids of the tiny LLMs of tests/test_stage2."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(NUM_SAMPLES, 3, 28, 28, generator=generator)
        self.prompts = [torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=generator) for n in PROMPT_LENGTHS]
        self.targets = [torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=generator) for n in TARGET_LENGTHS]

    def __len__(self):
        return NUM_SAMPLES

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "prompt": self.prompts[index], "target": self.targets[index]}


def right_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    length = max(len(row) for row in rows)
    return torch.stack([torch.cat([row, torch.full((length - len(row),), value)]) for row in rows])


class Collator:
    """OPT: [image placeholders] prompt target [EOS], labels on target [EOS]. T5: [image placeholders] prompt [EOS] to
    the encoder, target [EOS] to the decoder. Right padding (pad id, -100 in labels)."""

    def __init__(self, kind: str):
        self.config = TEXT_CONFIGS[kind]
        self.kind = kind

    def __call__(self, samples):
        eos, pad = self.config["eos_token_id"], self.config["pad_token_id"]
        image = torch.full((NUM_QUERY_TOKENS,), IMAGE_TOKEN_ID)
        batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}
        if self.kind == "opt":
            rows = [torch.cat([image, s["prompt"], s["target"], torch.tensor([eos])]) for s in samples]
            labels = [torch.cat([torch.full((NUM_QUERY_TOKENS + len(s["prompt"]),), -100), s["target"],
                                 torch.tensor([eos])]) for s in samples]
        else:
            rows = [torch.cat([image, s["prompt"], torch.tensor([eos])]) for s in samples]
            labels = [torch.cat([s["target"], torch.tensor([eos])]) for s in samples]
            batch["decoder_attention_mask"] = right_pad([torch.ones_like(row) for row in labels], 0)
        batch["input_ids"] = right_pad(rows, pad)
        batch["attention_mask"] = right_pad([torch.ones_like(row) for row in rows], 0)
        batch["labels"] = right_pad(labels, -100)
        return batch


class GradientAtStep(TrainerCallback):
    """Records the trainable parameters' gradient as the optimiser receives it (all micro-batches accumulated)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradient = torch.cat([parameter.grad.double().flatten() for parameter in model.parameters()
                                   if parameter.requires_grad])


def one_step(kind, output_dir, batch_size, accumulation_steps, accepts_loss_kwargs=True, **overrides):
    """The gradient of one optimiser step over all NUM_SAMPLES samples (plain SGD, no clipping), and its logged
    loss. Its parameter update is -learning_rate times this gradient."""
    model = stage2_model(kind)
    if not accepts_loss_kwargs:
        model.accepts_loss_kwargs = False  # what a model that ignores num_items_in_batch gets from Trainer
    args = tiny_training_arguments(
        output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation_steps,
        max_steps=1,
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        **overrides,
    )
    recorder = GradientAtStep()
    trainer = Blip2BridgeTrainer(
        model=model, args=args, train_dataset=PromptsAndTargets(), data_collator=Collator(kind), callbacks=[recorder]
    )
    trainer.train()
    (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return recorder.gradient, loss


def relative_difference(gradient: torch.Tensor, reference: torch.Tensor) -> float:
    return ((gradient - reference).norm() / reference.norm()).item()


# ---- gradient accumulation and processes: the token mean of the full batch -----------------------------------------


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_four_accumulated_batches_of_two_update_as_one_batch_of_eight(kind, tmp_path):
    full, full_loss = one_step(kind, tmp_path / "full", batch_size=8, accumulation_steps=1)
    accumulated, accumulated_loss = one_step(kind, tmp_path / "accumulated", batch_size=2, accumulation_steps=4)
    assert full.abs().max() > 1e-4  # a gradient well above rounding
    assert relative_difference(accumulated, full) <= 1e-4
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-5)
    # The control: averaging the micro-batches' own token means (what the LLM's loss gave before) is far off.
    mean_of_means, _ = one_step(kind, tmp_path / "means", batch_size=2, accumulation_steps=4, accepts_loss_kwargs=False)
    assert relative_difference(mean_of_means, full) > 0.05


def test_stage2_models_declare_that_they_take_num_items_in_batch(tmp_path):
    for kind in ("opt", "t5"):
        trainer = Blip2BridgeTrainer(model=stage2_model(kind), args=tiny_training_arguments(tmp_path))
        assert trainer.model_accepts_loss_kwargs is True
        # The Trainer counts a decoder-only LLM's targets after the first position (the loss shifts them), an
        # encoder-decoder LLM's all of them.
        assert trainer._loss_shifts_labels is (kind == "opt")


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_the_loss_is_the_summed_token_loss_over_num_items_in_batch(kind):
    model = stage2_model(kind).eval()
    batch = Collator(kind)([PromptsAndTargets()[index] for index in range(4)])
    with torch.no_grad():
        mean = model(**batch).loss
        divided = model(**batch, num_items_in_batch=torch.tensor(100)).loss
    num_targets = (batch["labels"][:, 1:] if kind == "opt" else batch["labels"]).ne(-100).sum().item()
    assert num_targets == sum(TARGET_LENGTHS[:4]) + 4
    torch.testing.assert_close(divided, mean * num_targets / 100)


class RecordingCollator:
    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, samples):
        self.batches.append(self.collator(samples))
        return self.batches[-1]


def test_stage1_accumulation_averages_the_micro_batch_losses_as_the_original(tmp_path, monkeypatch):
    """ITC and ITM contrast each micro-batch within itself, so no token count makes them add up to the full batch:
    stage 1 takes the mean of the micro-batch losses, as LAVIS's `loss /= accum_grad_iters` (lavis/tasks/base_task.py)
    does. The stage-1 batch has no `labels`, so Trainer passes no num_items_in_batch and divides by the steps."""
    monkeypatch.setattr(stage1_module, "sample_hard_negatives", hardest_negatives)  # no random draw
    model, collator = stage1_setup()
    recording = RecordingCollator(collator)
    recorder = GradientAtStep()
    args = tiny_training_arguments(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                   max_steps=1, optim="sgd", weight_decay=0.0, max_grad_norm=0.0)
    Blip2BridgeTrainer(model=model, args=args, train_dataset=CaptionedImages(4), data_collator=recording,
                       callbacks=[recorder]).train()
    assert len(recording.batches) == 2

    reference, _ = stage1_setup()
    for batch in recording.batches:
        (reference(**batch).loss / len(recording.batches)).backward()
    expected = torch.cat([p.grad.double().flatten() for p in reference.parameters() if p.requires_grad])
    assert relative_difference(recorder.gradient, expected) <= 1e-5
    # The one batch of four is another loss (more in-batch negatives), not what accumulation computes.
    reference.zero_grad()
    reference(**collator([CaptionedImages(4)[index] for index in range(4)])).loss.backward()
    full = torch.cat([p.grad.double().flatten() for p in reference.parameters() if p.requires_grad])
    assert relative_difference(recorder.gradient, full) > 0.05


WORLD_SIZE = 2


def run_rank(rank: int, port: int, out_dir: str):
    # What torchrun / accelerate launch export for each process; the Trainer initialises the process group from it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    results = {}
    for kind in ("opt", "t5"):
        gradient, loss = one_step(kind, f"{out_dir}/{kind}{rank}", batch_size=2, accumulation_steps=2,
                                  ddp_backend="gloo", ddp_find_unused_parameters=False)
        results[f"{kind}.gradient"], results[f"{kind}.loss"] = gradient, torch.tensor(loss)
    save_file(results, f"{out_dir}/rank{rank}.safetensors")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_accumulating_two_batches_of_two_update_as_one_batch_of_eight(tmp_path):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD_SIZE)]
    for kind in ("opt", "t5"):
        full, full_loss = one_step(kind, tmp_path / f"{kind}_full", batch_size=8, accumulation_steps=1)
        assert relative_difference(ranks[0][f"{kind}.gradient"], full) <= 1e-4, kind
        assert torch.equal(ranks[0][f"{kind}.gradient"], ranks[1][f"{kind}.gradient"])  # DDP keeps replicas equal
        assert ranks[0][f"{kind}.loss"].item() == pytest.approx(full_loss, rel=1e-5)


# ---- Q-Former captioning: the original's length limits -------------------------------------------------------------


def test_captions_have_the_original_beam_and_length_settings():
    config = tiny_model()._caption_generation_config()
    # LAVIS blip2_qformer.py Blip2Qformer.generate: num_beams=3, max_length=30, min_length=10.
    assert (config.num_beams, config.max_length, config.min_length) == (3, 30, 10)
    assert (config.eos_token_id, config.do_sample) == (SEP_ID, None)


def test_a_caption_cannot_end_before_min_length_even_when_sep_is_the_likeliest_token():
    model = tiny_model().eval()
    with torch.no_grad():
        model.itg_head.decoder.bias[SEP_ID] = 100.0  # [SEP] wins every step it is allowed
    pixel_values, _, _ = tiny_batch(batch_size=2)
    # The control: without a minimum the caption ends at once.
    assert model.generate(pixel_values=pixel_values, min_length=0).shape == (2, 2)
    for generate_kwargs in ({}, {"num_beams": 1}):
        generated = model.generate(pixel_values=pixel_values, **generate_kwargs)
        # [DEC] and 9 tokens (min_length=10 counts [DEC], as the original's), then [SEP].
        assert generated.shape == (2, 11)
        assert (generated[:, 1:10] != SEP_ID).all()
        assert (generated[:, 10] == SEP_ID).all()
