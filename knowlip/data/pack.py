"""`knowlip pack`: GeoTIFF scenes + captions -> WebDataset shards, streaming one scene at a time."""

from __future__ import annotations

import collections
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from knowlip.data.shards import ShardWriter, encode_sample, write_index
from knowlip.sar.geotiff import SarReadError, find_rasters, iter_chips
from knowlip.text.caption import GEO_FIELD, Caption, CaptionIndex, geo_clause


@dataclass
class PackReport:
    scenes_packed: int = 0
    samples: int = 0
    skipped_files: list[dict] = field(default_factory=list)  # {"file", "reason"}
    caption_errors: list[str] = field(default_factory=list)
    chips_without_caption: int = 0
    bands: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bands"], d["dtypes"] = dict(self.bands), dict(self.dtypes)
        return d


def pack(cfg) -> tuple[Path, PackReport]:
    """Pack `cfg.pack.inputs` into shards under `cfg.pack.out_dir`; returns (index path, report).

    `pack.jobs` > 1 reads and encodes scenes in that many processes (each holds a scene's encoded chips in memory,
    at most 2 x jobs scenes at a time) while this process writes them in input order: the shards and index.json
    are byte for byte those of `pack.jobs=1`, which streams one scene at a time."""
    p = cfg.pack
    started = time.perf_counter()
    files = find_rasters(p.inputs)
    caption_file = _caption_file(p)
    captions = CaptionIndex(caption_file)
    report = PackReport(caption_errors=list(captions.errors))
    writer = ShardWriter(p.out_dir, p.shard_max_samples, p.shard_max_bytes)
    with tqdm(total=len(files), desc="pack", unit="scene", dynamic_ncols=True) as bar:
        for path, samples, error in _scenes(files, p, captions, caption_file):
            try:
                _write_scene(samples, writer, report)
            except SarReadError as exc:  # a scene read here (jobs=1) fails part-way
                error = str(exc)
            if error is None:
                report.scenes_packed += 1
            else:
                report.skipped_files.append({"file": str(path), "reason": error})
            bar.update(1)
            bar.set_postfix(samples=report.samples, skipped=len(report.skipped_files))
    shards = writer.finish()
    report.seconds = round(time.perf_counter() - started, 3)
    info = {"chip_size": p.chip.size, "inputs": [str(f) for f in files],
            "report": {k: v for k, v in report.as_dict().items() if k != "seconds"}}  # no timing: reproducible
    return write_index(p.out_dir, shards, info), report


def _scenes(files: list[Path], p, captions: CaptionIndex, caption_file: str | None):
    """(path, samples, error) per scene in input order: streamed here when pack.jobs=1, else encoded by a pool."""
    if p.jobs <= 1:
        for path in files:
            yield path, _scene_samples(path, p, captions), None
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=p.jobs, initializer=_init_worker, initargs=(caption_file,)) as pool:
        pending: collections.deque = collections.deque()
        todo = iter(files)
        for path in todo:
            pending.append((path, pool.submit(_encode_scene, path, p)))
            if len(pending) >= 2 * p.jobs:
                break
        while pending:
            path, future = pending.popleft()
            samples, error = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_encode_scene, nxt, p)))
            yield path, iter(samples), error


_WORKER_CAPTIONS: CaptionIndex | None = None


def _init_worker(caption_file: str | None) -> None:
    global _WORKER_CAPTIONS
    _WORKER_CAPTIONS = CaptionIndex(caption_file)


def _encode_scene(path: Path, p) -> tuple[list, str | None]:
    """In a pool worker: a scene's samples, and the error that stopped it part-way (its chips so far are kept,
    as the streaming path keeps what it wrote)."""
    samples: list = []
    try:
        for sample in _scene_samples(path, p, _WORKER_CAPTIONS):
            samples.append(sample)
    except SarReadError as exc:
        return samples, str(exc)
    return samples, None


def _caption_file(p) -> str | None:
    if p.captions:
        return p.captions
    for item in p.inputs:
        candidate = Path(item) / "captions.jsonl"
        if candidate.is_file():
            return str(candidate)
    return None


def _scene_samples(path: Path, p, captions: CaptionIndex) -> Iterator[tuple | None]:
    """(key, members, bands, dtype) for each captioned chip of a scene, None for a chip without a caption."""
    chips = iter_chips(path, p.chip.size, p.chip.stride, p.chip.min_valid_fraction, p.read.product,
                       list(p.read.band_names))
    for chip in chips:
        caption = captions.lookup(chip.chip_id, chip.meta["scene_id"])
        text, spans = _caption_for(caption, chip.meta, p)
        if text is None:
            yield None
            continue
        meta = dict(chip.meta, keyword_spans=spans)
        yield (chip.chip_id, encode_sample(chip.data, text, meta), "+".join(chip.meta["polarisations"]),
               str(chip.data.dtype))


def _write_scene(samples: Iterator[tuple | None], writer: ShardWriter, report: PackReport) -> None:
    for sample in samples:
        if sample is None:
            report.chips_without_caption += 1
            continue
        key, members, bands, dtype = sample
        writer.write(key, members)
        report.bands[bands] += 1
        report.dtypes[dtype] += 1
        report.samples += 1  # counted as written: a scene that fails later keeps its chips in the shards


def _caption_for(caption: Caption | None, meta: dict, p) -> tuple[str | None, list]:
    geo = geo_clause(meta) if p.geo_clause else None
    if caption is None:
        if p.missing_caption != "geo_only" or not geo:
            return None, []
        caption = Caption({})
    if geo:
        caption = Caption({**caption.without(GEO_FIELD).clauses, GEO_FIELD: geo})
    return caption.text(), [list(s) for s in caption.keyword_spans()]
