"""Resumable shards split between two accelerate processes (gloo on CPU), results gathered in order everywhere."""

import json
import os

import pytest
import torch.multiprocessing as mp

from modeling_blip2.evaluation.shards import map_shards
from tests.helpers import free_port

WORLD_SIZE = 2


def run_rank(rank: int, port: int, directory: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    computed = []

    def compute(items: range) -> list[dict]:
        computed.append(list(items))
        return [{"item": item, "square": item * item, "process": rank} for item in items]

    results = map_shards(accelerator, f"{directory}/shards", num_items=7, shard_size=2, compute=compute)
    with open(f"{directory}/rank{rank}.json", "w") as file:
        json.dump({"num_processes": accelerator.num_processes, "computed": computed, "results": results}, file)
    accelerator.wait_for_everyone()


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_two_processes_split_the_shards_and_both_get_every_result_in_order(tmp_path):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # Four shards of 2, 2, 2 and 1 items: the first two on process 0, the others on process 1.
    assert ranks[0]["computed"] == [[0, 1], [2, 3]] and ranks[1]["computed"] == [[4, 5], [6]]
    for r in ranks:
        rows = [row for shard in r["results"] for row in shard]
        assert [row["square"] for row in rows] == [item * item for item in range(7)]
        assert [row["process"] for row in rows] == [0, 0, 0, 0, 1, 1, 1]
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == [
        f"shard-{index:05d}.jsonl" for index in range(4)
    ]
