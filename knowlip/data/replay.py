"""`knowlip data replay`: run the real loader for W ranks in one process and print which samples each rank
gets at each global step, so a user can audit the order and check that a resumed job sees the rest."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from knowlip.data.loader import StreamingLoader
from knowlip.data.shards import load_index


def replay(shards: str, world_size: int, workers: int, batch_size: int, epochs: int = 1, seed: int = 0,
           shuffle_block: int = 8192, drop_last: bool = True, stop_after_steps: int | None = None,
           resume_state: str | None = None) -> tuple[list[dict], dict]:
    """Returns (one record per global step, the loader state after the last step)."""
    with warnings.catch_warnings():
        # simulating W ranks x K workers on one machine is the point: torch's "too many workers" note is noise
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return _replay(shards, world_size, workers, batch_size, epochs, seed, shuffle_block, drop_last,
                       stop_after_steps, resume_state)


def _replay(shards, world_size, workers, batch_size, epochs, seed, shuffle_block, drop_last, stop_after_steps,
            resume_state) -> tuple[list[dict], dict]:
    index = load_index(shards)
    loaders = [StreamingLoader(index, batch_size, rank, world_size, workers, seed, shuffle_block, drop_last,
                               decode_chip=False) for rank in range(world_size)]
    if resume_state:
        state = json.loads(Path(resume_state).read_text())
        for loader in loaders:
            loader.load_state_dict(state)
    records: list[dict] = []
    last_epoch = loaders[0].epoch + epochs
    while loaders[0].epoch < last_epoch:
        for batches in _lockstep(loaders):
            records.append({"epoch": loaders[0].epoch, "step_in_epoch": batches[0]["step_in_epoch"],
                            "cursor": loaders[0].cursor,
                            "ranks": [[k for k, dup in zip(b["keys"], b["is_duplicate"]) if not dup] for b in batches],
                            "skipped": sum(len(b["skipped"]) for b in batches)})
            if stop_after_steps is not None and len(records) >= stop_after_steps:
                return records, loaders[0].state_dict()
    return records, loaders[0].state_dict()


def _lockstep(loaders: list[StreamingLoader]) -> Iterator[list[dict]]:
    """Step all ranks together, as the collectives of a real job would; they must agree on the step count."""
    iterators = [iter(loader) for loader in loaders]
    while True:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            return
        if any(b is None for b in batches):
            raise RuntimeError("ranks yielded different numbers of batches in one epoch")
        yield batches


def write_records(records: list[dict], out: TextIO) -> None:
    for i, rec in enumerate(records):
        out.write(json.dumps({"global_step": i, **rec}) + "\n")
