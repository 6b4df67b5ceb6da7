"""`knowlip pack`: GeoTIFF scenes + captions -> WebDataset shards, streaming one scene at a time."""

from __future__ import annotations

import collections
import dataclasses
import shutil
import signal
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from knowlip.data.shards import (INDEX_NAME, MEMBERS, ShardError, ShardWriter, encode_sample, load_index,
                                 write_index)
from knowlip.data.storage import StorageOptions, is_url, open_store, storage_options
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
    with staged_output(p.out_dir, p.overwrite, storage) as out:
        writer = ShardWriter(out, p.shard_max_samples, p.shard_max_bytes, storage)
        report = _pack_files(files, p, writer)
        _finish(p, out, files, writer, report, started, storage)
    return open_store(p.out_dir, storage).url(INDEX_NAME), report


class PackOutputError(ValueError):
    """--out holds something a packing must not replace."""


def _is_ours(name: str) -> bool:
    return name == INDEX_NAME or (name.startswith("shard-") and name.endswith((".tar", ".idx.npy")))


def check_pack_output(out: str, overwrite: bool, storage: StorageOptions | None = None) -> bool:
    """Refuse an --out that holds files other than a packing's, or a packing without `overwrite`. Returns
    whether --out is on an object store."""
    store = open_store(out, storage)
    if store.remote:
        existing = store.list("")
    else:
        existing = sorted(q.name for q in Path(out).iterdir()) if Path(out).is_dir() else []
    foreign = [n for n in existing if not _is_ours(n)]
    if foreign:
        raise PackOutputError(f"{out}: holds files that are not shards ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); pack into an empty or new folder")
    if existing and not overwrite:
        raise PackOutputError(f"{out}: already holds a packed dataset ({len(existing)} files); pack into a new "
                              "folder, or pass --overwrite (pack.overwrite=true) to replace it once the new one is "
                              "complete")
    return store.remote


@contextmanager
def staged_output(out: str, overwrite: bool, storage: StorageOptions | None = None) -> Iterator[str]:
    """Where a packing writes. A folder: a staging folder beside it, swapped in (two renames) only once the
    packing is complete, so that a killed or failed packing leaves the earlier dataset whole. An object store
    has no rename: shards go in place and index.json last. Either way a non-empty --out is refused unless
    `overwrite`, and never replaced when it holds files that are not a packing's."""
    final = Path(out)
    staging, old = final.parent / f".{final.name}.staging", final.parent / f".{final.name}.old"
    if not is_url(out) and old.is_dir() and not final.exists():
        old.rename(final)  # a packing killed between its two renames: the earlier dataset comes back first
    if check_pack_output(out, overwrite, storage):
        yield out
        return
    shutil.rmtree(staging, ignore_errors=True)  # a killed packing's leftovers
    staging.mkdir(parents=True)
    try:
        yield str(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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


def _finish(p, out: str, files: list[Path], writer: ShardWriter, report: PackReport, started: float,
            storage: StorageOptions) -> None:
    shards = writer.finish()
    report.seconds = round(time.perf_counter() - started, 3)
    info = {"chip_size": p.chip.size, "inputs": [str(f) for f in files],
            "report": {k: v for k, v in report.as_dict().items() if k != "seconds"}}  # no timing: reproducible
    write_index(out, shards, info, storage)


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
    with staged_output(p.out_dir, p.overwrite, storage) as out:
        writer = ShardWriter(out, p.shard_max_samples, p.shard_max_bytes, storage)
        report = _merge_into(writer, part_dirs)
        _finish(p, out, files, writer, report, started, storage)
    return open_store(p.out_dir, storage).url(INDEX_NAME), report


def _merge_into(writer: ShardWriter, part_dirs: list[str]) -> PackReport:
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
    return report


def pack_on_slurm(cfg, profile, tasks: int) -> tuple[str, PackReport, list[str]]:
    """Submit `tasks` array tasks (one CPU task each, resources from the cluster profile), wait, merge here.
    Returns (index path, report, job ids)."""
    import shutil

    from knowlip.config import check_no_literal_secrets, to_yaml
    from knowlip.launch import slurm

    check_no_literal_secrets(cfg, "the Slurm pack job")
    check_pack_output(cfg.pack.out_dir, cfg.pack.overwrite, storage_options(cfg.storage))  # before the array runs

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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle: one line, no tracebacks
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
                       list(p.read.band_names), p.max_scene_values)
    for chip in chips:
        caption = captions.lookup(chip.chip_id, chip.meta["scene_id"])
        text, spans = _caption_for(caption, chip.meta, p)
        if text is None:
            yield None
            continue
        meta = dict(chip.meta, keyword_spans=spans)
        known, noise = captions.truth(chip.chip_id, chip.meta["scene_id"])
        if known:  # the truth goes into the metadata, the caption's text stays as given
            meta["caption_noise"] = noise
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
