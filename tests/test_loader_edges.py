"""Loader resume at the edges of an epoch, and state from another dataset (issue 13's planted bugs)."""

import json
import shutil

import pytest

from knowlip.data.loader import StreamingLoader


def loaders(shards, world: int, batch: int) -> list[StreamingLoader]:
    return [StreamingLoader(shards, batch, rank=r, world_size=world, drop_last=False, decode_chip=False)
            for r in range(world)]


def epoch_keys(ranks: list[StreamingLoader]) -> tuple[list[list[str]], list[dict]]:
    """Each rank's keys for the rest of the epoch, and each rank's state right after the epoch's last step
    (before the loader has rolled over to the next epoch)."""
    iters = [iter(loader) for loader in ranks]
    keys: list[list[str]] = [[] for _ in ranks]
    states = [loader.state_dict() for loader in ranks]
    while True:
        batches = [next(it, None) for it in iters]  # every rank's generator runs to its end (the epoch rolls over)
        if all(b is None for b in batches):
            return keys, states
        assert all(b is not None for b in batches), "ranks disagree on the number of steps"
        for r, b in enumerate(batches):
            keys[r] += b["keys"]
        states = [loader.state_dict() for loader in ranks]


# batch 5: a partial last step at every world size; (3 ranks, batch 31): 96 = 93 + 3, the rest equals the ranks
@pytest.mark.parametrize("world,batch", [(1, 5), (2, 5), (3, 5), (3, 31)])
def test_resume_right_after_the_partial_last_step_of_an_epoch(synth_shards, world, batch):
    straight = loaders(synth_shards, world, batch)
    first, end_states = epoch_keys(straight)
    total = sum(len(k) for k in first)
    assert total == 96 and all(s["cursor"] == 96 for s in end_states)  # every sample once, the cursor at the end
    expected_next, _ = epoch_keys(straight)  # the uninterrupted run's next epoch
    resumed = loaders(synth_shards, world, batch)
    for loader, state in zip(resumed, end_states):
        loader.load_state_dict(state)
    rest, _ = epoch_keys(resumed)
    assert rest == [[] for _ in range(world)]  # nothing left of epoch 0
    assert all(loader.epoch == 1 for loader in resumed)
    assert epoch_keys(resumed)[0] == expected_next


def test_state_of_another_dataset_with_the_same_sample_count_is_refused(synth_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(synth_shards, other)
    index = json.loads((other / "index.json").read_text())
    first = index["shard_columns"]["name"][0]
    (other / first).rename(other / "shard-000099.tar")
    (other / first.replace(".tar", ".idx.npy")).rename(other / "shard-000099.idx.npy")
    index["shard_columns"]["name"][0] = "shard-000099.tar"
    (other / "index.json").write_text(json.dumps(index))
    source = StreamingLoader(synth_shards, 4, decode_chip=False)
    next(iter(source))
    target = StreamingLoader(other, 4, decode_chip=False)
    assert target.num_samples == source.num_samples
    with pytest.raises(ValueError, match="fingerprint"):
        target.load_state_dict(source.state_dict())


def test_lazy_order_is_todays_epoch_order_on_any_slice():
    """The order computed lazily (no per-sample array) equals the materialised one, so runs resume unchanged."""
    import numpy as np

    from knowlip.data.loader import LazyOrder, epoch_order

    rng = np.random.default_rng(1)
    for _ in range(40):
        sizes = [int(x) for x in rng.integers(0, 50, rng.integers(1, 12))]
        if not sum(sizes):
            continue
        block, seed, epoch = int(rng.integers(1, 40)), int(rng.integers(0, 5)), int(rng.integers(0, 3))
        full = epoch_order(sizes, seed, epoch, block)
        lazy = LazyOrder(sizes, seed, epoch, block)
        assert len(lazy) == len(full) and np.array_equal(lazy[0:len(full)], full), (sizes, block)
        for _ in range(10):
            a = int(rng.integers(0, len(full)))
            b = int(rng.integers(a, len(full) + 1))
            assert np.array_equal(lazy[a:b], full[a:b])
    huge = LazyOrder([1000] * 1_000_000, 0, 0, 8192)  # 1e9 samples: set-up O(shards), no 8 GB array
    ids = huge[500_000_000:500_000_064]
    assert len(set(ids.tolist())) == 64 and ids.min() >= 0 and ids.max() < 10**9
