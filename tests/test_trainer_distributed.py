"""Blip2BridgeTrainer under DistributedDataParallel: two CPU processes over gloo, set up through the environment
variables torchrun and accelerate launch set, end a few steps with the weights of one process with the doubled batch."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import modeling_blip2.modeling_stage1 as stage1_module
from modeling_blip2 import Blip2BridgeTrainer
from tests.helpers import CAPTIONS, free_port, hardest_negatives
from tests.trainer_helpers import (
    CaptionedImages,
    stage1_setup,
    tiny_training_arguments,
    trainable_state,
)

WORLD_SIZE = 2
PER_RANK_BATCH = 2
STEPS = 3
# Captions of eight words each: every process then predicts the same number of ITG tokens, so the mean of the
# per-process token means is the token mean of the doubled batch.
EQUAL_LENGTH_CAPTIONS = [index for index, caption in enumerate(CAPTIONS) if len(caption.split()) == 8]


class EqualLengthCaptions(CaptionedImages):
    def __init__(self, size: int = 16):
        super().__init__(size)

    def __getitem__(self, index):
        return super().__getitem__(EQUAL_LENGTH_CAPTIONS[index % len(EQUAL_LENGTH_CAPTIONS)])


def train(output_dir, batch_size: int, **overrides) -> tuple[Blip2BridgeTrainer, torch.nn.Module]:
    model, collator = stage1_setup()
    args = tiny_training_arguments(output_dir, per_device_train_batch_size=batch_size, max_steps=STEPS, **overrides)
    trainer = Blip2BridgeTrainer(model=model, args=args, train_dataset=EqualLengthCaptions(), data_collator=collator)
    trainer.train()
    return trainer, model


def run_rank(rank: int, port: int, out_dir: str):
    # What torchrun / accelerate launch export for each process; the Trainer initialises the process group from it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    stage1_module.sample_hard_negatives = hardest_negatives
    trainer, model = train(out_dir, PER_RANK_BATCH, ddp_backend="gloo", ddp_find_unused_parameters=False)
    assert trainer.args.world_size == WORLD_SIZE and trainer.args.parallel_mode.value == "distributed"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {f"log.{name}": torch.tensor([entry[name] for entry in logs])
              for name in ("loss", "loss_itc", "loss_itm", "loss_itg")}
    save_file({**trainable_state(model), **result}, f"{out_dir}/rank{rank}.safetensors")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_to_the_weights_of_one_process_with_the_doubled_batch(tmp_path, monkeypatch):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD_SIZE)]

    monkeypatch.setattr(stage1_module, "sample_hard_negatives", hardest_negatives)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, model = train(tmp_path / "single", WORLD_SIZE * PER_RANK_BATCH)
    finally:
        torch.set_num_threads(threads)
    single = trainable_state(model)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        logged = torch.tensor([entry[name] for entry in logs])
        torch.testing.assert_close(ranks[0][f"log.{name}"].to(logged.dtype), logged, rtol=1e-5, atol=1e-5)
    initial, _ = stage1_setup()
    # Attention key biases shift every score of a query by the same amount, which softmax ignores: their gradient
    # is zero but for rounding, and Adam turns that rounding into steps of the learning rate's size. They differ
    # between any two summation orders and are left out.
    compared = [name for name in single if not name.endswith("key.bias")]
    assert len(compared) > 0.9 * len(single)
    # Each Adam step moves a weight by about the learning rate (1e-3); 5e-5 is 2% of the three steps.
    mismatched = {name: (ranks[0][name] - single[name]).abs().max().item() for name in compared
                  if not torch.allclose(ranks[0][name], single[name], rtol=1e-4, atol=5e-5)}
    assert not mismatched
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the replicas identical
    moved = [name for name, weights in single.items() if not torch.equal(weights, initial.get_parameter(name))]
    assert len(moved) == len(single)
