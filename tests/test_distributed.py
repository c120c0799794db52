"""Two CPU processes over gloo against one process with the doubled batch: losses, ITM logits and gradients."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from modeling_blip2 import modeling_stage1
from tests.helpers import free_port, hardest_negatives
from tests.tiny_models import PAD_ID, SEP_ID, tiny_batch, tiny_model

WORLD_SIZE = 2
PER_RANK_BATCH = 3
COMPARED_GRADIENTS = ["query_tokens", "temp", "vision_proj.weight", "text_proj.weight", "vision_layernorm.weight",
                      "qformer.layer.0.crossattention.key.weight", "qformer.layer.1.text_feed_forward.output.weight",
                      "itg_head.dense.weight", "itm_head.weight"]
# ITM alone: what reaches the images through the negatives that live on the other process.
ITM_GRADIENTS = ["query_tokens", "vision_layernorm.weight", "vision_layernorm.bias",
                 "qformer.layer.0.crossattention.key.weight", "qformer.layer.2.crossattention.value.weight",
                 "qformer.layer.1.attention.query.weight", "itm_head.weight"]
# Rank 1's captions end early: it trims its padding, so the two processes hold texts of different padded lengths.
SHORT_LENGTH = 5


def step(model, pixel_values, input_ids, attention_mask, losses, gradients) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    sum(getattr(out, loss) for loss in losses).backward()
    result = {loss: getattr(out, loss).detach().reshape(1) for loss in losses}
    result["itm_logits"] = out.itm_logits.detach()
    result.update({name: model.get_parameter(name).grad.clone() for name in gradients})
    return result


def run_rank(rank: int, port: int, out_dir: str, gather_with_grad: bool):
    torch.set_num_threads(1)
    modeling_stage1.sample_hard_negatives = hardest_negatives  # this spawned process's own copy of the module
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = tiny_model(gather_with_grad=gather_with_grad).train()
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        pixel_values, input_ids, attention_mask = full_batch()
        full = step(model, pixel_values[rows], input_ids[rows], attention_mask[rows],
                    ("loss_itc", "loss_itm", "loss_itg"), COMPARED_GRADIENTS)
        pixel_values, input_ids, attention_mask = padded_batch()
        columns = slice(None, SHORT_LENGTH if rank == 1 else None)
        padded = step(model, pixel_values[rows], input_ids[rows, columns], attention_mask[rows, columns],
                      ("loss_itm",), ITM_GRADIENTS)
        # Gradients are averaged over the processes, as DistributedDataParallel does.
        for result, names in ((full, COMPARED_GRADIENTS), (padded, ITM_GRADIENTS)):
            for name in names:
                dist.all_reduce(result[name])
                result[name] /= WORLD_SIZE
        save_file({**{f"full.{k}": v for k, v in full.items()}, **{f"padded.{k}": v for k, v in padded.items()}},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def full_batch():
    # Every caption unpadded, so ITG's token mean over one process equals the mean over the doubled batch.
    pixel_values, input_ids, _ = tiny_batch(batch_size=WORLD_SIZE * PER_RANK_BATCH, text_length=8, seed=4)
    input_ids[input_ids == 0] = 11
    return pixel_values, input_ids, torch.ones_like(input_ids)


def padded_batch():
    """The doubled batch with rank 1's captions (rows 3-5) ending at SHORT_LENGTH, padded to 8 columns."""
    pixel_values, input_ids, attention_mask = full_batch()
    input_ids[PER_RANK_BATCH:, SHORT_LENGTH - 1] = SEP_ID
    input_ids[PER_RANK_BATCH:, SHORT_LENGTH:] = PAD_ID
    attention_mask[PER_RANK_BATCH:, SHORT_LENGTH:] = 0
    return pixel_values, input_ids, attention_mask


def rank_rows(single_logits: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of one process's ITM logits in the single process's [positives; negative images; negative texts]."""
    batch = WORLD_SIZE * PER_RANK_BATCH
    return torch.cat([single_logits[part * batch + rank * PER_RANK_BATCH :][:PER_RANK_BATCH] for part in range(3)])


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path, gather_with_grad, monkeypatch):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path), gather_with_grad), nprocs=WORLD_SIZE, join=True)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD_SIZE)]

    monkeypatch.setattr(modeling_stage1, "sample_hard_negatives", hardest_negatives)
    model = tiny_model(gather_with_grad=gather_with_grad).train()
    singles = {
        "full": step(model, *full_batch(), ("loss_itc", "loss_itm", "loss_itg"), COMPARED_GRADIENTS),
        "padded": step(model, *padded_batch(), ("loss_itm",), ITM_GRADIENTS),
    }
    for part, single in singles.items():
        for loss in [key for key in single if key.startswith("loss")]:
            mean_over_ranks = sum(r[f"{part}.{loss}"] for r in ranks) / WORLD_SIZE
            torch.testing.assert_close(mean_over_ranks, single[loss], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{part}.{loss}: {m}")
        for rank, result in enumerate(ranks):
            # Each process scores its pairs, its negatives drawn from both processes, as the one process does.
            torch.testing.assert_close(result[f"{part}.itm_logits"], rank_rows(single["itm_logits"], rank),
                                       atol=1e-5, rtol=0, msg=f"{part} rank {rank}")
        for name in COMPARED_GRADIENTS if part == "full" else ITM_GRADIENTS:
            # Relative to the gradient's norm: float32 sums in another order differ by ~1e-7 of it.
            relative_error = ((ranks[0][f"{part}.{name}"] - single[name]).norm() / single[name].norm()).item()
            assert relative_error < 1e-5, f"{part}.{name}: relative gradient error {relative_error:.2e}"
    # Some negatives live on the other process (otherwise the cross-process paths would go untested).
    negatives = singles["full"]["itm_logits"].shape[0]
    assert negatives == 3 * WORLD_SIZE * PER_RANK_BATCH
