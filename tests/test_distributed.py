"""Two CPU processes over gloo against one process with the doubled batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.tiny_models import tiny_batch, tiny_model

WORLD_SIZE = 2
PER_RANK_BATCH = 3
COMPARED_GRADIENTS = ["query_tokens", "temp", "vision_proj.weight", "text_proj.weight", "vision_layernorm.weight",
                      "qformer.layer.0.crossattention.key.weight", "qformer.layer.1.text_feed_forward.output.weight",
                      "itg_head.dense.weight"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def itc_itg_step(model, pixel_values, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """ITC + ITG loss and gradients (ITM draws random negatives, so it is left out of the comparison)."""
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    (out.loss_itc + out.loss_itg).backward()
    result = {"loss_itc": out.loss_itc.detach().reshape(1), "loss_itg": out.loss_itg.detach().reshape(1),
              "itm_logits_rows": torch.tensor([float(out.itm_logits.shape[0])])}
    result.update({name: model.get_parameter(name).grad.clone() for name in COMPARED_GRADIENTS})
    return result


def run_rank(rank: int, port: int, out_dir: str, gather_with_grad: bool):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = tiny_model(gather_with_grad=gather_with_grad).train()
        pixel_values, input_ids, attention_mask = full_batch()
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        result = itc_itg_step(model, pixel_values[rows], input_ids[rows], attention_mask[rows])
        # Gradients are averaged over the processes, as DistributedDataParallel does.
        for name in COMPARED_GRADIENTS:
            dist.all_reduce(result[name])
            result[name] /= WORLD_SIZE
        # Texts of different padded lengths on each process still gather for ITM negatives.
        short = 5 if rank == 1 else 8
        model(pixel_values=pixel_values[rows], input_ids=input_ids[rows, :short],
              attention_mask=attention_mask[rows, :short]).loss.backward()
        save_file(result, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def full_batch():
    # Every caption unpadded, so ITG's token mean over one process equals the mean over the doubled batch.
    pixel_values, input_ids, _ = tiny_batch(batch_size=WORLD_SIZE * PER_RANK_BATCH, text_length=8, seed=4)
    input_ids[input_ids == 0] = 11
    return pixel_values, input_ids, torch.ones_like(input_ids)


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path, gather_with_grad):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path), gather_with_grad), nprocs=WORLD_SIZE, join=True)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD_SIZE)]

    single = itc_itg_step(tiny_model(gather_with_grad=gather_with_grad).train(), *full_batch())
    for loss in ("loss_itc", "loss_itg"):
        mean_over_ranks = sum(r[loss] for r in ranks) / WORLD_SIZE
        torch.testing.assert_close(mean_over_ranks, single[loss], atol=1e-5, rtol=1e-5)
    for name in COMPARED_GRADIENTS:
        torch.testing.assert_close(ranks[0][name], single[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert single[name].abs().sum() > 0, name
    assert ranks[0]["itm_logits_rows"].item() == 3 * PER_RANK_BATCH
