"""The streaming loader through its real code path (DataLoader workers included)."""

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from knowlip.data import loader as loader_mod
from knowlip.data.loader import StepSlices, StreamingLoader, epoch_order
from knowlip.data.replay import replay
from knowlip.data.shards import ShardError, load_index


def keys_by_step(loaders, max_steps=None):
    """Run ranks in lockstep; list of per-step lists of per-rank key lists (duplicates removed)."""
    out = []
    its = [iter(l) for l in loaders]
    while max_steps is None or len(out) < max_steps:
        batches = [next(it, None) for it in its]
        if all(b is None for b in batches):
            break
        assert all(b is not None for b in batches), "ranks disagree on the number of batches"
        out.append([[k for k, d in zip(b["keys"], b["is_duplicate"]) if not d] for b in batches])
    return out


def make(shards, world, workers, batch, **kw):
    return [StreamingLoader(shards, batch, r, world, workers, **kw) for r in range(world)]


def flat(steps):
    return [k for step in steps for rank in step for k in rank]


def test_fixture_has_uneven_shards(synth_shards):
    sizes = [s.samples for s in load_index(synth_shards).shards]
    assert len(set(sizes)) > 1 and len(sizes) >= 3


def test_one_epoch_covers_every_sample_once_and_ranks_agree(synth_shards):
    n = load_index(synth_shards).total_samples
    steps = keys_by_step(make(synth_shards, 3, 2, 5, drop_last=False, shuffle_block=16))
    keys = flat(steps)
    assert len(keys) == len(set(keys)) == n
    assert all(len(step) == 3 for step in steps)


def test_order_is_independent_of_worker_count(synth_shards):
    a = keys_by_step(make(synth_shards, 2, 0, 4, shuffle_block=16))
    b = keys_by_step(make(synth_shards, 2, 3, 4, shuffle_block=16))
    assert a == b and len(a) > 3


def test_resume_at_same_world_size_is_identical(synth_shards):
    full = keys_by_step(make(synth_shards, 2, 2, 4, shuffle_block=16))
    first = make(synth_shards, 2, 2, 4, shuffle_block=16)
    head = keys_by_step(first, max_steps=5)
    state = json.loads(json.dumps(first[0].state_dict()))  # as saved in a checkpoint
    assert all(l.state_dict() == state for l in first)  # one state for every rank
    resumed = make(synth_shards, 2, 1, 4, shuffle_block=16)  # another worker count, same layout
    for l in resumed:
        l.load_state_dict(state)
    tail = keys_by_step(resumed)
    assert head + tail == full


@pytest.mark.parametrize("before,after", [((2, 2, 4), (1, 3, 4)), ((1, 1, 6), (3, 2, 3)), ((3, 0, 2), (2, 4, 5))])
def test_elastic_resume_sees_every_sample_exactly_once(synth_shards, before, after):
    n = load_index(synth_shards).total_samples
    w1, k1, b1 = before
    first = make(synth_shards, w1, k1, b1, shuffle_block=16)
    head = flat(keys_by_step(first, max_steps=4))
    state = first[0].state_dict()
    w2, k2, b2 = after
    second = make(synth_shards, w2, k2, b2, shuffle_block=16)
    for l in second:
        l.load_state_dict(state)
    tail = flat(keys_by_step(second))
    seen = head + tail
    assert len(seen) == len(set(seen)), "a sample was repeated"
    # drop_last leaves fewer than one global batch of the new layout unseen, and it is the end of the order
    assert n - len(seen) < w2 * b2
    order = first[0].order(0)
    reader = loader_mod.ShardReader(load_index(synth_shards))
    expected_prefix = [loader_mod.decode_sample(m, False).key for m in reader.read_many(order[: len(seen)])]
    assert sorted(seen) == sorted(expected_prefix)


def test_fewer_shards_than_ranks_times_workers(synth_shards, tmp_path):
    index = load_index(synth_shards)
    assert len(index.shards) < 4 * 3
    steps = keys_by_step(make(synth_shards, 4, 3, 2, drop_last=False, shuffle_block=8))
    assert len(set(flat(steps))) == index.total_samples


def test_epochs_reshuffle_and_each_covers_all(synth_shards):
    (l,) = make(synth_shards, 1, 2, 7, drop_last=False, shuffle_block=32)
    e0, e1 = flat(keys_by_step([l])), flat(keys_by_step([l]))
    assert l.epoch == 2
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_resume_reads_only_what_is_left(synth_shards, monkeypatch):
    (first,) = make(synth_shards, 1, 0, 8, shuffle_block=16)
    keys_by_step([first], max_steps=3)
    reads = Counter()
    real = loader_mod.ShardReader.read_many
    monkeypatch.setattr(loader_mod.ShardReader, "read_many",
                        lambda self, ids: reads.update(int(g) for g in ids) or real(self, ids))
    (second,) = make(synth_shards, 1, 0, 8, shuffle_block=16)
    second.load_state_dict(first.state_dict())
    next(iter(second))
    assert sum(reads.values()) == 8  # one batch read: nothing consumed before the resume is re-read


def test_state_from_another_dataset_or_seed_is_refused(synth_shards):
    (a,) = make(synth_shards, 1, 0, 4, seed=1)
    (b,) = make(synth_shards, 1, 0, 4, seed=2)
    with pytest.raises(ValueError, match="seed=1"):
        b.load_state_dict(a.state_dict())


@pytest.fixture
def shard_copy(synth_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(synth_shards, dst)
    return dst


@pytest.mark.parametrize("where", [512, 20])  # the .npy magic; the tar header's member name (bad checksum)
def test_corrupt_sample_is_skipped_counted_and_batch_size_kept(shard_copy, where):
    index = load_index(shard_copy)
    shard = index.shards[1]
    offset, _ = index.table(1).sample_range(shard.samples // 2)  # a sample in the middle of a shard
    path = index.path(shard)
    raw = bytearray(path.read_bytes())
    raw[offset + where : offset + where + 8] = b"garbage!"
    path.write_bytes(bytes(raw))
    loaders = make(shard_copy, 2, 2, 4, drop_last=False, shuffle_block=16)
    steps, sizes = [], []
    its = [iter(l) for l in loaders]
    for batches in zip(*its):
        sizes += [b["chips"].shape[0] for b in batches[:-1]]
        steps.append([[k for k, d in zip(b["keys"], b["is_duplicate"]) if not d] for b in batches])
    assert sum(l.stats.skipped for l in loaders) == 1
    assert set(sizes) == {4}
    assert len(flat(steps)) == index.total_samples - 1


def test_missing_or_truncated_shard_is_a_clear_error(shard_copy):
    index = load_index(shard_copy)
    victim = index.path(index.shards[2])
    victim.write_bytes(victim.read_bytes()[:1024])
    with pytest.raises(ShardError, match=f"{victim.name}: size 1024 differs"):
        StreamingLoader(shard_copy, 4)
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name}: shard listed in .* is missing"):
        StreamingLoader(shard_copy, 4)


def test_plan_functions():
    order = epoch_order([5, 3, 7], seed=0, epoch=0, block=4)
    assert sorted(order.tolist()) == list(range(15))
    assert not np.array_equal(order, epoch_order([5, 3, 7], seed=0, epoch=1, block=4))
    assert list(StepSlices(10, 0, 2, 2, drop_last=True)) == [[(0, 2), (2, 4)], [(4, 6), (6, 8)]]
    assert list(StepSlices(11, 8, 2, 2, drop_last=False)) == [[(8, 9), (9, 11)]]
    assert list(StepSlices(9, 8, 2, 2, drop_last=False)) == []  # fewer left than ranks: dropped


def test_lazy_step_slices_equal_the_steps_built_one_by_one():
    """StepSlices computes step k arithmetically; here the steps are built by walking the cursor."""
    def walk(n, cursor, world, batch, drop_last):
        steps = []
        while n - cursor >= world * batch:
            steps.append([(cursor + r * batch, cursor + (r + 1) * batch) for r in range(world)])
            cursor += world * batch
        rest = n - cursor
        if rest >= world and not drop_last:
            cut = [cursor + rest * r // world for r in range(world + 1)]
            steps.append([(cut[r], cut[r + 1]) for r in range(world)])
        return steps

    for n in (0, 1, 7, 24, 25, 97):
        for cursor in sorted({c for c in (0, 3, n // 2, n) if c <= n}):
            for world, batch, drop_last in [(1, 4, True), (2, 3, False), (3, 2, False), (3, 5, True), (4, 1, False)]:
                lazy = StepSlices(n, cursor, world, batch, drop_last)
                expected = walk(n, cursor, world, batch, drop_last)
                assert len(lazy) == len(expected) and list(lazy) == expected, (n, cursor, world, batch, drop_last)
                assert [list(lazy.for_rank(r)) for r in range(world)] == [[s[r] for s in expected]
                                                                         for r in range(world)]


def test_tokenised_batches_mark_keywords(synth_shards, tmp_path):
    from knowlip.text.tokenizer import CaptionTokenizer, load_tokenizer, train_wordpiece

    (plain,) = make(synth_shards, 1, 0, 8)
    captions = [c for b in plain for c in b["captions"]]
    tok = CaptionTokenizer(load_tokenizer(train_wordpiece(captions, tmp_path / "tok", vocab_size=500)), 96)
    (l,) = make(synth_shards, 1, 2, 8, tokenizer=tok)
    batch = next(iter(l))
    assert batch["input_ids"].shape == (8, 96) and batch["keyword_mask"].dtype == torch.bool
    words = tok.tok.convert_ids_to_tokens(batch["input_ids"][0][batch["keyword_mask"][0]].tolist())
    text = " ".join(words).replace(" ##", "")
    assert "classified" not in text and "presence" not in text  # template prefixes are not keywords
    assert batch["keyword_mask"].sum() > 0.3 * batch["attention_mask"].sum()


def test_replay_cli_save_and_resume_at_another_world_size(synth_shards, tmp_path):
    state = tmp_path / "state.json"
    cli = [sys.executable, "-m", "knowlip.cli", "data", "replay", str(synth_shards), "--shuffle-block", "16"]
    first = subprocess.run(cli + ["--world-size", "2", "--workers", "2", "--batch-size", "3", "--stop-after-steps",
                                  "4", "--save-state", str(state), "--keep-last"], capture_output=True, text=True,
                           check=True)
    second = subprocess.run(cli + ["--world-size", "3", "--workers", "1", "--batch-size", "2", "--resume-state",
                                   str(state), "--keep-last"], capture_output=True, text=True, check=True)
    lines = [json.loads(l) for l in (first.stdout + second.stdout).splitlines()]
    assert [len(l["ranks"]) for l in lines[:4]] == [2] * 4 and all(len(l["ranks"]) == 3 for l in lines[4:])
    keys = [k for l in lines for r in l["ranks"] for k in r]
    assert len(keys) == len(set(keys)) == load_index(synth_shards).total_samples
    records, _ = replay(str(synth_shards), 2, 0, 3, shuffle_block=16, drop_last=False, stop_after_steps=4)
    assert [r["ranks"] for r in records] == [l["ranks"] for l in lines[:4]]


def test_a_chip_of_another_shape_is_skipped_even_when_it_comes_first():
    from knowlip.data.loader import _RankSteps
    from knowlip.data.shards import encode_sample

    good = lambda i: dict(encode_sample(np.zeros((1, 4, 4), np.float32), "c", {}), __key__=f"k{i}".encode())
    odd = dict(encode_sample(np.zeros((1, 5, 5), np.float32), "c", {}), __key__=b"odd")
    members = [odd, good(1), good(2)]

    class FakeReader:
        def read_many(self, gids):
            return [members[g] for g in gids]

        def key_of(self, gid):
            return "shard", gid

    batch = _RankSteps(None, np.arange(3), [], 0, None, True)._build(FakeReader(), np.arange(3))
    assert batch["chips"].shape == (3, 1, 4, 4)
    assert batch["is_duplicate"].tolist() == [True, False, False] and "odd" in batch["skipped"][0]


def test_a_local_reader_keeps_a_bounded_number_of_shards_open(synth_shards, monkeypatch):
    """An epoch over many shards must not run out of file descriptors: least recently used shards are closed."""
    from knowlip.data import storage

    monkeypatch.setattr(storage, "OPEN_FILES", 2)
    expected = flat(keys_by_step(make(synth_shards, 1, 0, 8, shuffle_block=10**6)))
    index = load_index(synth_shards)
    assert index.num_shards > 2
    loader = StreamingLoader(index, 8, shuffle_block=10**6)
    seen = []
    for batch in loader:
        seen += [k for k, d in zip(batch["keys"], batch["is_duplicate"]) if not d]
        assert len(index.store._files) <= 2
    assert seen == expected
