"""Loader throughput: a bare webdataset loop vs knowlip's StreamingLoader with 0, 1 and K workers (and in
process without checksum verification, to price it).

All on the same shards: 224x224 float32 single-channel chips with ~100-word structured captions. The bare
loop is webdataset read + np.load + json/text decode + tokenise + stack, one process, no state tracking.
Figures are samples/s, printed as one JSON line per configuration. Usage:
    .venv/bin/python bench/data_throughput.py [--samples 2048] [--batch-size 64] [--workers 2 4 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process, as in a loader worker
import torch

from knowlip.data.loader import StreamingLoader
from knowlip.data.shards import ShardWriter, encode_sample, index_v1_body, load_index, write_index
from knowlip.text.caption import FIELDS, make_caption
from knowlip.text.tokenizer import CaptionTokenizer, load_tokenizer, train_wordpiece

WORDS = ("flat agricultural plain with irrigated parcels dense urban blocks bright scatterers river banks "
         "north south east west centre sparse buildings road crossing lake shore vegetation cropland").split()


def make_shards(root: Path, samples: int, size: int, per_shard: int) -> list[str]:
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, per_shard, 2**40)
    captions = []
    for i in range(samples):
        clauses = {f: " ".join(rng.choice(WORDS, 10)) for f in FIELDS}  # ~100 words with the prefixes
        cap = make_caption(clauses, geo=f"{rng.uniform(-60, 60):.4f}N {rng.uniform(0, 150):.4f}E")
        chip = rng.gamma(4.0, 0.25, (1, size, size)).astype(np.float32)
        meta = {"keyword_spans": [list(s) for s in cap.keyword_spans()], "product": "intensity"}
        writer.write(f"s{i:07d}", encode_sample(chip, cap.text(), meta))
        captions.append(cap.text())
    write_index(root, writer.finish(), {"report": {"dtypes": {"float32": samples}}})
    return captions


def bare_loop(urls: list[str], tokenizer: CaptionTokenizer, batch_size: int) -> int:
    import webdataset as wds

    n, chips, texts, spans = 0, [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        chips.append(np.load(io.BytesIO(sample["chip.npy"])))
        texts.append(sample["txt"].decode())
        spans.append(json.loads(sample["json"])["keyword_spans"])
        if len(chips) == batch_size:
            batch = {"chips": torch.from_numpy(np.stack(chips)), **tokenizer(texts, spans)}
            n += batch["chips"].shape[0]
            chips, texts, spans = [], [], []
    return n


def without_checksums(root: Path, out: Path) -> Path:
    """The same shards (linked) under an index without per-sample checksums: the loader then verifies nothing,
    which prices the verification."""
    out.mkdir()
    for shard in root.glob("shard-*.tar"):
        (out / shard.name).symlink_to(shard)
    (out / "index.json").write_text(json.dumps(index_v1_body(load_index(root), checksums=False)))
    return out


def ours(root: Path, tokenizer: CaptionTokenizer, batch_size: int, workers: int) -> int:
    loader = StreamingLoader(root, batch_size, num_workers=workers, tokenizer=tokenizer, shuffle_block=8192)
    return sum(b["chips"].shape[0] for b in loader)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        captions = make_shards(root, args.samples, args.size, args.per_shard)
        tokenizer = CaptionTokenizer(load_tokenizer(train_wordpiece(captions, Path(tmp) / "tok", 2000)), 160)
        urls = [str(p) for p in sorted(root.glob("shard-*.tar"))]
        unverified = without_checksums(root, Path(tmp) / "unverified")
        bare_loop(urls, tokenizer, args.batch_size)  # warm the page cache
        runs = {"bare_webdataset_loop": lambda: timed(bare_loop, urls, tokenizer, args.batch_size),
                "knowlip_in_process": lambda: timed(ours, root, tokenizer, args.batch_size, 0),
                "knowlip_in_process_no_checksums": lambda: timed(ours, unverified, tokenizer, args.batch_size, 0),
                "knowlip_1_worker": lambda: timed(ours, root, tokenizer, args.batch_size, 1)}
        for k in args.workers:
            runs[f"knowlip_{k}_workers"] = lambda k=k: timed(ours, root, tokenizer, args.batch_size, k)
        results = {name: max(run() for _ in range(args.repeats)) for name, run in runs.items()}
    bare = results["bare_webdataset_loop"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    for name, rate in results.items():
        print(json.dumps({"config": name, "samples_per_s": round(rate, 1), "vs_bare": round(rate / bare, 3),
                          "samples": args.samples, "chip": f"1x{args.size}x{args.size} float32",
                          "batch_size": args.batch_size, "machine": machine}))


if __name__ == "__main__":
    main()
