"""Resumable work split across processes: each shard's result is one file, and a shard on disk is never redone."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: tensor.contiguous().cpu() for name, tensor in tensors.items()}, str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# How a shard's result is stored: (file suffix, write, read).
JSONL = (".jsonl", write_jsonl, read_jsonl)
TENSORS = (".safetensors", write_tensors, read_tensors)


def map_shards(
    accelerator: Accelerator,
    directory: str | Path,
    num_items: int,
    shard_size: int,
    compute: Callable[[range], Any],
    storage=JSONL,
) -> list[Any]:
    """Runs `compute(range of items)` for every shard of `shard_size` items; returns the results of all shards, in
    order, on every process.

    Shards are split between the processes. Shard i's result is written to `directory/shard-{i:05d}{suffix}` as soon as
    it is done (atomically, so an interrupted write leaves no file); a shard whose file exists is read back instead of
    computed, so an interrupted run resumes where it stopped.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size is {shard_size}; expected at least 1 item per shard")
    suffix, write, read = storage
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]
    finished = []
    with accelerator.split_between_processes(list(range(len(shards)))) as own_shards:
        for index in own_shards:
            path = directory / f"shard-{index:05d}{suffix}"
            if path.exists():
                result = read(path)
            else:
                result = compute(shards[index])
                partial = path.with_name(f".{path.name}.{accelerator.process_index}.partial")
                write(result, partial)
                os.replace(partial, path)
            finished.append((index, result))
    if accelerator.num_processes > 1:
        finished = gather_object(finished)
    return [result for _, result in sorted(finished, key=lambda pair: pair[0])]


def check_resumable(
    output_dir: Path,
    run_arguments: dict,
    accelerator: Accelerator,
    arguments_file: str = "evaluation_arguments.json",
    run_name: str = "an evaluation",
) -> None:
    """Shards left by an earlier run are reused only when that run had the same arguments (kept in `arguments_file`)."""
    path = Path(output_dir) / arguments_file
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != run_arguments:
            changed = sorted(name for name in run_arguments if earlier.get(name) != run_arguments[name])
            raise ValueError(
                f"{output_dir} holds {run_name} with other arguments ({', '.join(changed)} differ); its shards "
                "cannot be reused: choose another --output or delete it"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run_arguments, indent=2) + "\n")
    accelerator.wait_for_everyone()
