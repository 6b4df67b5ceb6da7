"""`knowlip pack`: GeoTIFF scenes + captions -> WebDataset shards, streaming one scene at a time."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from knowlip.data.shards import MEMBERS, ShardError, ShardWriter, encode_sample, load_index, write_index
from knowlip.data.storage import StorageOptions, is_url, storage_options
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
    """Pack `cfg.pack.inputs` into shards under `cfg.pack.out_dir` (a folder or an object-store URL); returns
    (index.json's path or URL, report).

    `pack.jobs` > 1 reads and encodes scenes in that many processes (each holds a scene's encoded chips in memory,
    at most 2 x jobs scenes at a time) while this process writes them in input order: the shards and index.json
    are byte for byte those of `pack.jobs=1`, which streams one scene at a time."""
    p = cfg.pack
    started = time.perf_counter()
    files = find_rasters(p.inputs)
    storage = storage_options(cfg.storage)
    writer = ShardWriter(p.out_dir, p.shard_max_samples, p.shard_max_bytes, storage)
    report = _pack_files(files, p, writer)
    return _finish(p, files, writer, report, started, storage)


def _pack_files(files: list[Path], p, writer: ShardWriter) -> PackReport:
    caption_file = _caption_file(p)
    captions = CaptionIndex(caption_file)
    report = PackReport(caption_errors=list(captions.errors))
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
    return report


def _finish(p, files: list[Path], writer: ShardWriter, report: PackReport, started: float,
            storage: StorageOptions) -> tuple[str, PackReport]:
    shards = writer.finish()
    report.seconds = round(time.perf_counter() - started, 3)
    info = {"chip_size": p.chip.size, "inputs": [str(f) for f in files],
            "report": {k: v for k, v in report.as_dict().items() if k != "seconds"}}  # no timing: reproducible
    return write_index(p.out_dir, shards, info, storage), report


# ----------------------------------------------------------------------------------------------------------
# Packing as a Slurm array: each task packs a contiguous share of the scenes into one part; one merge writes
# the final shards in scene order, so the output equals a local pack's byte for byte.
# ----------------------------------------------------------------------------------------------------------


def split_files(files: list[Path], parts: int) -> list[list[Path]]:
    """Contiguous shares, in input order (concatenated they are the input order again)."""
    bounds = [len(files) * i // parts for i in range(parts + 1)]
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def pack_part(cfg_yaml: str, files: list[str], part_dir: str) -> str:
    """One array task: its scenes into a single part tar + index.json (the report rides along)."""
    from omegaconf import OmegaConf

    p = OmegaConf.create(cfg_yaml).pack
    writer = ShardWriter(part_dir, 2**62, 2**62)
    report = _pack_files([Path(f) for f in files], p, writer)
    write_index(part_dir, writer.finish(), {"report": report.as_dict()})
    return part_dir


def merge_parts(cfg, files: list[Path], part_dirs: list[str]) -> tuple[str, PackReport]:
    """The parts' samples (checked against their checksums) re-written in order with the real shard limits."""
    p = cfg.pack
    started = time.perf_counter()
    storage = storage_options(cfg.storage)
    writer = ShardWriter(p.out_dir, p.shard_max_samples, p.shard_max_bytes, storage)
    report = PackReport()
    for n, part_dir in enumerate(part_dirs):
        index = load_index(part_dir)
        part = index.info["report"]
        if n == 0:  # every part read the same caption file: its errors once
            report.caption_errors = list(part["caption_errors"])
        for s in range(index.num_shards):
            for _, members in index.shard_samples(s):
                if isinstance(members, ShardError):  # a part damaged between packing and merging
                    raise members
                writer.write(members.pop("__key__").decode(), {ext: members[ext] for ext in MEMBERS})
        report.scenes_packed += part["scenes_packed"]
        report.samples += part["samples"]
        report.chips_without_caption += part["chips_without_caption"]
        report.skipped_files += part["skipped_files"]
        report.bands.update(part["bands"])
        report.dtypes.update(part["dtypes"])
    return _finish(p, files, writer, report, started, storage)


def pack_on_slurm(cfg, profile, tasks: int) -> tuple[str, PackReport, list[str]]:
    """Submit `tasks` array tasks (one CPU task each, resources from the cluster profile), wait, merge here.
    Returns (index path, report, job ids)."""
    import shutil

    from knowlip.config import check_no_literal_secrets, to_yaml
    from knowlip.launch import slurm

    check_no_literal_secrets(cfg, "the Slurm pack job")

    files = find_rasters(cfg.pack.inputs)
    shares = [share for share in split_files(files, max(1, min(tasks, len(files)))) if share]
    # the parts sit on the (shared) file system: beside the output, or in the working folder for a remote one
    out = cfg.pack.out_dir
    parts_root = (Path.cwd() / ".knowlip-pack-parts" if is_url(out)
                  else Path(out).resolve().parent / f".{Path(out).name}.parts")
    shutil.rmtree(parts_root, ignore_errors=True)
    part_dirs = [str(parts_root / f"part-{i:05d}") for i in range(len(shares))]
    one_task = dataclasses.replace(profile, nodes=1, tasks_per_node=1, gpus_per_node=0)  # per array element
    slurm.check_against_cluster(one_task)
    executor = slurm.make_executor(one_task, slurm.submission_folder(one_task, "pack"), "knowlip-pack")
    cfg_yaml = to_yaml(cfg)
    jobs = executor.map_array(pack_part, [cfg_yaml] * len(shares), [[str(f) for f in s] for s in shares], part_dirs)
    for job in jobs:
        job.result()  # raises the task's error
    index_path, report = merge_parts(cfg, files, part_dirs)
    shutil.rmtree(parts_root, ignore_errors=True)
    return index_path, report, [str(j.job_id) for j in jobs]


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
