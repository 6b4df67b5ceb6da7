"""The streaming loader: shards -> batches on every rank, with exact, elastic mid-epoch resume.

How an epoch is laid out (everything is a pure function of the seed, the epoch and the shard index, never of
the world size or the worker count):

1. Canonical order. The shards are permuted with (seed, epoch) and their samples concatenated; that sequence
   is cut into blocks of `shuffle_block` samples, each permuted with (seed, epoch, block). The result is one
   global order of every sample of the epoch: a shuffle that mixes neighbouring shards at no memory cost.
2. Consumption. A single integer, the cursor, says how many samples of that order are consumed. A global step
   takes the next world_size * batch_size samples; rank r takes its slice of them. The last step of an epoch
   is dropped (`drop_last`) or split evenly over the ranks, so every rank yields the same number of batches.
3. Workers. Worker k of a rank builds steps k, k+K, k+2K, ...; torch's DataLoader returns them in step order,
   so the batches do not depend on the worker count.

The loader's state is (epoch, cursor): resuming at any world size, worker count or batch size continues the
same order with no sample repeated or lost, and costs O(1): samples are read by byte offset (each shard's
sample table), a batch at a time, from a folder or an object store.
At the same world size and batch size the order after resume is identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, abc
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from knowlip.data.shards import (CAPTION_EXT, CHIP_EXT, META_EXT, CorruptSample, ShardError, ShardIndex, load_index,
                                  npy_header)
from knowlip.launch.signals import ignore_stop_signals

log = logging.getLogger(__name__)
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# The plan: pure functions of (index, seed, epoch) and (cursor, world size, batch size)
# ----------------------------------------------------------------------------------------------------------


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, block: int) -> np.ndarray:
    """The canonical order of the epoch, materialised: global sample ids (shards numbered in index order). The
    loader uses LazyOrder, the same sequence without the array; this is its definition and test oracle."""
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    shard_perm = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes))
    order = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shard_perm] or [np.zeros(0, np.int64)])
    for b, lo in enumerate(range(0, len(order), block)):
        chunk = order[lo : lo + block]
        order[lo : lo + block] = chunk[np.random.default_rng([seed, epoch, b + 1]).permutation(len(chunk))]
    return order.astype(np.int64)


class LazyOrder:
    """epoch_order's sequence without materialising it: O(shards) set-up, then each block of `block` positions
    is permuted on first use (and cached, one at a time). order[a:b] equals epoch_order(...)[a:b] exactly, so a
    run resumes unchanged; memory no longer grows with the sample count."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, epoch: int, block: int):
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        perm = np.random.default_rng([seed, epoch]).permutation(len(sizes))
        self.seed, self.epoch, self.block = seed, epoch, block
        self.length = int(starts[-1])
        self._first_id = starts[:-1][perm]  # the shard-permuted concatenation: each piece's first sample id,
        self._piece_ends = np.cumsum(sizes[perm])  # where each piece ends and starts in position
        self._piece_starts = self._piece_ends - sizes[perm]
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def _base(self, positions: np.ndarray) -> np.ndarray:
        """Ids at these positions of the shard-permuted concatenation (before the block shuffle)."""
        piece = np.searchsorted(self._piece_ends, positions, side="right")
        return self._first_id[piece] + (positions - self._piece_starts[piece])

    def _block_perm(self, b: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != b:
            size = min(self.block, self.length - b * self.block)
            self._cached = (b, np.random.default_rng([self.seed, self.epoch, b + 1]).permutation(size))
        return self._cached[1]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("LazyOrder supports contiguous slices only")
        positions = np.arange(start, stop, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        blocks = positions // self.block
        for b in np.unique(blocks):
            mask = blocks == b
            lo = int(b) * self.block
            out[mask] = self._base(lo + self._block_perm(int(b))[positions[mask] - lo])
        return out


class StepSlices(abc.Sequence):
    """For every remaining step of the epoch, each rank's [start, stop) positions in the canonical order,
    computed on demand (a billion-sample epoch has millions of steps: no list of them is built). Full steps
    take world_size * batch_size positions; the last, smaller step (unless drop_last) is split as evenly as the
    ranks allow, and dropped when fewer positions than ranks are left."""

    def __init__(self, num_samples: int, cursor: int, world_size: int, batch_size: int, drop_last: bool):
        self.cursor, self.world_size, self.batch_size = cursor, world_size, batch_size
        self.full_steps = (num_samples - cursor) // (world_size * batch_size)
        self.rest = num_samples - cursor - self.full_steps * world_size * batch_size
        self.partial = self.rest >= world_size and not drop_last

    def __len__(self) -> int:
        return self.full_steps + int(self.partial)

    def __getitem__(self, k: int) -> list[tuple[int, int]]:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        start = self.cursor + k * self.world_size * self.batch_size
        if k < self.full_steps:
            return [(start + r * self.batch_size, start + (r + 1) * self.batch_size) for r in range(self.world_size)]
        bounds = [start + (self.rest * r) // self.world_size for r in range(self.world_size + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def for_rank(self, rank: int) -> "RankSlices":
        return RankSlices(self, rank)


class RankSlices(abc.Sequence):
    """One rank's [start, stop) of each remaining step (a view of StepSlices)."""

    def __init__(self, steps: StepSlices, rank: int):
        self.steps, self.rank = steps, rank

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> tuple[int, int]:
        return self.steps[k][self.rank]


def step_size(slices: list[tuple[int, int]]) -> int:
    return slices[-1][1] - slices[0][0]


# ----------------------------------------------------------------------------------------------------------
# Reading, decoding and collating one rank's batch
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    chip: np.ndarray | None
    caption: str
    meta: dict


def decode_sample(members: dict[str, bytes], decode_chip: bool = True) -> Sample:
    """Raises ShardError (or a decode error) for a sample that cannot be used."""
    missing = [ext for ext in (CHIP_EXT, CAPTION_EXT, META_EXT) if ext not in members]
    if missing:
        raise ShardError(f"sample {members.get('__key__', b'?').decode()}: missing members {missing}")
    chip = _load_npy(members[CHIP_EXT]) if decode_chip else None
    return Sample(members["__key__"].decode(), chip, members[CAPTION_EXT].decode("utf-8"),
                  json.loads(members[META_EXT]))


def _load_npy(raw: bytes) -> np.ndarray:
    """np.load without copying the payload (the batch stack makes the one copy)."""
    shape, dtype, offset = npy_header(raw)
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


class ShardReader:
    """Samples by global id (shards numbered in index order), a batch at a time through the index's store."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.starts = np.concatenate([[0], np.cumsum(index.samples)])

    def locate(self, global_id: int) -> tuple[int, int]:
        """(shard number, sample number inside it)."""
        s = int(np.searchsorted(self.starts, global_id, side="right") - 1)
        return s, int(global_id - self.starts[s])

    def read_many(self, global_ids: Sequence[int]) -> list[dict[str, bytes] | ShardError]:
        return self.index.read_samples([self.locate(int(g)) for g in global_ids])

    def key_of(self, global_id: int) -> tuple[str, int]:
        s, i = self.locate(global_id)
        return self.index.names[s], i

    def close(self) -> None:
        self.index.store.close()


def collate(samples: list[Sample], is_duplicate: list[bool], tokenizer: Callable | None) -> dict:
    batch: dict = {
        "keys": [s.key for s in samples],
        "captions": [s.caption for s in samples],
        "meta": [s.meta for s in samples],
        "is_duplicate": torch.tensor(is_duplicate, dtype=torch.bool),
    }
    if samples[0].chip is not None:
        batch["chips"] = _stack(samples)
    if tokenizer is not None:
        batch.update(tokenizer(batch["captions"], [s.meta.get("keyword_spans", []) for s in samples]))
    return batch


# ----------------------------------------------------------------------------------------------------------
# The dataset each worker iterates, and the loader the trainer holds
# ----------------------------------------------------------------------------------------------------------


def _stack(samples: list[Sample]) -> torch.Tensor:
    """Stack chips; in a worker, straight into shared memory (saves the copy the hand-over would make)."""
    first = samples[0].chip
    out = torch.from_numpy(np.empty((len(samples),) + first.shape, first.dtype))
    if get_worker_info() is not None:
        out = out.share_memory_()
    np.stack([s.chip for s in samples], out=out.numpy())
    return out


class _RankSteps(IterableDataset):
    """One rank's remaining steps of one epoch; worker k builds steps k, k+K, ..."""

    def __init__(self, index: ShardIndex, order: np.ndarray, slices: Sequence[tuple[int, int]], first_step: int,
                 tokenizer: Callable | None, decode_chip: bool):
        self.index, self.order, self.slices, self.first_step = index, order, slices, first_step
        self.tokenizer, self.decode_chip = tokenizer, decode_chip

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.index)
        try:
            for i in range(worker, len(self.slices), workers):
                lo, hi = self.slices[i]
                batch = self._build(reader, self.order[lo:hi])
                batch["step_in_epoch"] = self.first_step + i
                yield batch
        finally:
            reader.close()

    def _build(self, reader: ShardReader, ids: np.ndarray) -> dict:
        samples: list[Sample | None] = []
        errors: list[str] = []
        for gid, members in zip(ids, reader.read_many(ids)):
            try:
                if isinstance(members, ShardError):
                    raise members
                samples.append(decode_sample(members, self.decode_chip))
            except (ShardError, tarfile.TarError, ValueError, KeyError, UnicodeDecodeError, EOFError) as exc:
                shard, i = reader.key_of(int(gid))
                cause = "checksum" if isinstance(exc, CorruptSample) else "unreadable"
                errors.append(f"{cause}: {shard}#{i}: {type(exc).__name__}: {exc}")
                samples.append(None)
        good = [s for s in samples if s is not None]
        if good and self.decode_chip:  # the batch's layout is its most common one; odd chips are damaged
            layout = Counter((s.chip.dtype.str, s.chip.shape) for s in good).most_common(1)[0][0]
            for j, s in enumerate(samples):
                if s is not None and (s.chip.dtype.str, s.chip.shape) != layout:
                    errors.append(f"layout: {s.key}: chip {s.chip.dtype}{s.chip.shape} differs from the batch's "
                                  f"{np.dtype(layout[0])}{layout[1]}")
                    samples[j] = None
            good = [s for s in samples if s is not None]
        if not good:
            raise ShardError(f"every sample of a batch is unreadable: {errors[:3]}")
        # Keep the batch size fixed (collectives need equal shapes): a bad sample's slot repeats a good one.
        filled = [s if s is not None else good[0] for s in samples]
        batch = collate(filled, [s is None for s in samples], self.tokenizer)
        batch["skipped"] = errors
        return batch


@dataclass
class LoaderStats:
    samples: int = 0
    skipped: int = 0
    dropped_at_epoch_end: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first few, for the log
    skipped_by_cause: dict = field(default_factory=dict)  # checksum | unreadable | layout -> count


class StreamingLoader:
    """Batches for one rank. Iterate it for the rest of the current epoch; state_dict() between batches."""

    def __init__(self, shards: str | Path | ShardIndex, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle_block: int = 8192, drop_last: bool = True,
                 tokenizer: Callable | None = None, decode_chip: bool = True, prefetch_factor: int = 4,
                 pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1 or shuffle_block < 1:
            raise ValueError("batch_size and shuffle_block must be positive")
        self.index = shards if isinstance(shards, ShardIndex) else load_index(shards)
        _check_uniform(self.index)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.seed, self.shuffle_block, self.drop_last = seed, shuffle_block, drop_last
        self.tokenizer, self.decode_chip, self.pin_memory = tokenizer, decode_chip, pin_memory
        self.epoch, self.cursor, self.step_in_epoch = 0, 0, 0
        self.stats = LoaderStats()
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_samples(self) -> int:
        return self.index.total_samples

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, LazyOrder(self.index.samples, self.seed, epoch, self.shuffle_block))
        return self._order_cache[1]

    def remaining_steps(self) -> StepSlices:
        return StepSlices(self.num_samples, self.cursor, self.world_size, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        """Batches left in the current epoch (the same on every rank)."""
        return len(self.remaining_steps())

    def __iter__(self) -> Iterator[dict]:
        steps = self.remaining_steps()
        dataset = _RankSteps(self.index, self.order(self.epoch), steps.for_rank(self.rank), self.step_in_epoch,
                             self.tokenizer, self.decode_chip)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.num_workers else None,
                            worker_init_fn=ignore_stop_signals,
                            # its own generator: creating the iterator must not draw from torch's global RNG,
                            # or a resumed run's random stream (masking, negatives) would shift
                            generator=torch.Generator().manual_seed(self.seed))
        expected = self.step_in_epoch
        for batch, slices in zip(loader, steps):
            if batch["step_in_epoch"] != expected:  # guards the in-order contract of the DataLoader
                raise RuntimeError(f"loader produced step {batch['step_in_epoch']}, expected {expected}")
            self._account(batch, step_size(slices))
            expected += 1
            yield batch
        self.stats.dropped_at_epoch_end += self.num_samples - self.cursor
        self.epoch, self.cursor, self.step_in_epoch = self.epoch + 1, 0, 0

    def _account(self, batch: dict, consumed: int) -> None:
        self.cursor += consumed
        self.step_in_epoch += 1
        self.stats.samples += len(batch["keys"])
        if batch["skipped"]:
            self.stats.skipped += len(batch["skipped"])
            self.stats.skipped_examples = (self.stats.skipped_examples + batch["skipped"])[:20]
            for msg in batch["skipped"]:
                cause = msg.split(":", 1)[0]
                self.stats.skipped_by_cause[cause] = self.stats.skipped_by_cause.get(cause, 0) + 1
                log.warning("skipped sample %s", msg)

    # -- resumable state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
                "step_in_epoch": self.step_in_epoch, "seed": self.seed, "shuffle_block": self.shuffle_block,
                "num_samples": self.num_samples, "fingerprint": self.index.fingerprint(),
                "world_size": self.world_size, "batch_size": self.batch_size,
                "stats": {"samples": self.stats.samples, "skipped": self.stats.skipped,
                          "dropped_at_epoch_end": self.stats.dropped_at_epoch_end,
                          "skipped_by_cause": dict(self.stats.skipped_by_cause)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped; the world size, worker count and batch size may differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("fingerprint", self.index.fingerprint()), ("seed", self.seed),
                          ("shuffle_block", self.shuffle_block), ("num_samples", self.num_samples)):
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]!r} but this loader has {mine!r}: "
                                 "the epoch order would differ, so the resume could not be exact")
        if not 0 <= state["cursor"] <= self.num_samples:
            raise ValueError(f"loader state cursor {state['cursor']} is outside [0, {self.num_samples}]")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        same_layout = state["world_size"] == self.world_size and state["batch_size"] == self.batch_size
        self.step_in_epoch = int(state["step_in_epoch"]) if same_layout else 0
        stats = state.get("stats", {})
        self.stats = LoaderStats(stats.get("samples", 0), stats.get("skipped", 0), stats.get("dropped_at_epoch_end", 0),
                                 skipped_by_cause=dict(stats.get("skipped_by_cause", {})))


def _check_uniform(index: ShardIndex) -> None:
    report = index.info.get("report", {})
    dtypes = report.get("dtypes", {})
    if len(dtypes) > 1:
        raise ShardError(f"{index.root}: samples of several dtypes {sorted(dtypes)} cannot share a batch; pack each "
                         "product kind into its own shard folder")


def shard_captions(index: ShardIndex) -> list[str]:
    """Every caption of a shard folder (one pass, chips not decoded), for training a tokenizer."""
    loader = StreamingLoader(index, batch_size=256, drop_last=False, decode_chip=False)
    return [c for batch in loader for c in batch["captions"]]


def build_loader(data_cfg, rank: int = 0, world_size: int = 1, tokenizer: Callable | None = None,
                 pin_memory: bool = False, index: ShardIndex | None = None) -> StreamingLoader:
    """The loader described by a `data` config section (pin_memory when batches go to a GPU; `index` when the
    caller has already loaded data_cfg.shards, with its storage options)."""
    return StreamingLoader(index or data_cfg.shards, data_cfg.batch_size, rank, world_size, data_cfg.num_workers,
                           data_cfg.seed, data_cfg.shuffle_block, data_cfg.drop_last, tokenizer,
                           prefetch_factor=data_cfg.prefetch_factor, pin_memory=pin_memory)
