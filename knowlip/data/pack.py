"""`knowlip pack`: GeoTIFF scenes + captions -> WebDataset shards, streaming one scene at a time."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
    """Pack `cfg.pack.inputs` into shards under `cfg.pack.out_dir`; returns (index path, report)."""
    p = cfg.pack
    started = time.perf_counter()
    files = find_rasters(p.inputs)
    captions = CaptionIndex(_caption_file(p))
    report = PackReport(caption_errors=list(captions.errors))
    writer = ShardWriter(p.out_dir, p.shard_max_samples, p.shard_max_bytes)
    with tqdm(files, desc="pack", unit="scene", dynamic_ncols=True) as bar:
        for path in bar:
            try:
                _pack_scene(path, p, captions, writer, report)
            except SarReadError as exc:
                report.skipped_files.append({"file": str(path), "reason": str(exc)})
            bar.set_postfix(samples=report.samples, skipped=len(report.skipped_files))
    shards = writer.finish()
    report.seconds = round(time.perf_counter() - started, 3)
    info = {"chip_size": p.chip.size, "inputs": [str(f) for f in files], "report": report.as_dict()}
    return write_index(p.out_dir, shards, info), report


def _caption_file(p) -> str | None:
    if p.captions:
        return p.captions
    for item in p.inputs:
        candidate = Path(item) / "captions.jsonl"
        if candidate.is_file():
            return str(candidate)
    return None


def _pack_scene(path: Path, p, captions: CaptionIndex, writer: ShardWriter, report: PackReport) -> None:
    chips = iter_chips(path, p.chip.size, p.chip.stride, p.chip.min_valid_fraction, p.read.product,
                       list(p.read.band_names))
    for chip in chips:
        caption = captions.lookup(chip.chip_id, chip.meta["scene_id"])
        text, spans = _caption_for(caption, chip.meta, p)
        if text is None:
            report.chips_without_caption += 1
            continue
        meta = dict(chip.meta, keyword_spans=spans)
        writer.write(chip.chip_id, encode_sample(chip.data, text, meta))
        report.bands["+".join(chip.meta["polarisations"])] += 1
        report.dtypes[str(chip.data.dtype)] += 1
        report.samples += 1  # counted as written: a scene that fails later keeps its chips in the shards
    report.scenes_packed += 1


def _caption_for(caption: Caption | None, meta: dict, p) -> tuple[str | None, list]:
    geo = geo_clause(meta) if p.geo_clause else None
    if caption is None:
        if p.missing_caption != "geo_only" or not geo:
            return None, []
        caption = Caption({})
    if geo:
        caption = Caption({**caption.without(GEO_FIELD).clauses, GEO_FIELD: geo})
    return caption.text(), [list(s) for s in caption.keyword_spans()]
