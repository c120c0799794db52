"""A stage-1 run killed with SIGKILL after a checkpoint, resumed from it, ends with the weights of a run never
interrupted: model, optimiser, schedule, data order and the RNG that draws ITM's hard negatives all come back.

Run as a script (`python -m tests.test_resume OUTPUT_DIR`) it is the run that gets killed.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from modeling_blip2 import Blip2BridgeTrainer
from tests.trainer_helpers import CaptionedImages, stage1_setup, tiny_training_arguments, trainable_state

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
SAVE_STEPS = 3  # mid-epoch: 16 samples in batches of 4 make 4 steps an epoch, so the run also crosses an epoch


def make_trainer(output_dir, callbacks=()) -> tuple[Blip2BridgeTrainer, torch.nn.Module]:
    torch.set_num_threads(1)
    model, collator = stage1_setup()
    args = tiny_training_arguments(output_dir, max_steps=TOTAL_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
                                   learning_rate=1e-3)
    trainer = Blip2BridgeTrainer(model=model, args=args, train_dataset=CaptionedImages(16), data_collator=collator,
                                 callbacks=list(callbacks))
    return trainer, model


class AnnounceSaveThenHang(TrainerCallback):
    """Tells the parent that a checkpoint is complete, then waits to be killed."""

    def on_save(self, args, state, control, **kwargs):
        print(f"saved checkpoint-{state.global_step}", flush=True)
        time.sleep(600)


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    killed_dir = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "tests.test_resume", str(killed_dir)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in child.stdout:
            if line.startswith("saved checkpoint-"):
                break
        else:
            pytest.fail(f"the training process ended (code {child.wait()}) without saving a checkpoint")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    checkpoints = sorted(path.name for path in killed_dir.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{SAVE_STEPS}"]

    threads = torch.get_num_threads()
    try:
        resumed, resumed_model = make_trainer(killed_dir)
        resumed.train(resume_from_checkpoint=str(killed_dir / checkpoints[-1]))
        uninterrupted, uninterrupted_model = make_trainer(tmp_path / "uninterrupted")
        uninterrupted.train()
    finally:
        torch.set_num_threads(threads)

    assert resumed.state.global_step == uninterrupted.state.global_step == TOTAL_STEPS
    expected = trainable_state(uninterrupted_model)
    for name, weights in trainable_state(resumed_model).items():
        assert torch.equal(weights, expected[name]), name
    # Steps 1-3 logged by the killed process, 4-6 after the resume: the same losses, ITM's random negatives included.
    for name in ("loss", "loss_itm", "loss_itg"):
        resumed_losses = [entry[name] for entry in resumed.state.log_history if "loss" in entry]
        assert resumed_losses == [entry[name] for entry in uninterrupted.state.log_history if "loss" in entry]
        assert len(resumed_losses) == TOTAL_STEPS


if __name__ == "__main__":
    trainer, _ = make_trainer(sys.argv[1], callbacks=[AnnounceSaveThenHang()])
    trainer.train()
