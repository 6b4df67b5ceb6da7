"""`knowlip data inspect`: what a shard folder holds (counts, bands, dtypes, extent, caption statistics)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict

import numpy as np

from knowlip.data.shards import CAPTION_EXT, CHIP_EXT, META_EXT, load_index, npy_header
from knowlip.text.caption import FIELDS, CaptionError, parse_caption


class _Stats:
    """Counts gathered over every sample."""

    def __init__(self) -> None:
        self.bands, self.dtypes, self.shapes = Counter(), Counter(), Counter()
        self.products, self.crs, self.clauses = Counter(), Counter(), Counter()
        self.keywords: dict[str, Counter] = defaultdict(Counter)
        self.words: list[int] = []
        self.lons: list[float] = []
        self.lats: list[float] = []
        self.samples = self.unparsed = 0

    def add(self, sample: dict[str, bytes]) -> None:
        meta = json.loads(sample[META_EXT])
        shape, dtype, _ = npy_header(sample[CHIP_EXT])
        self.samples += 1
        self.bands["+".join(meta["polarisations"])] += 1
        self.dtypes[str(dtype)] += 1
        self.shapes["x".join(map(str, shape))] += 1
        self.products[meta["product"]] += 1
        self.crs[meta["crs"] if meta["crs"].startswith("EPSG") else "WKT"] += 1
        lon, lat = meta["center_lonlat"]
        self.lons.append(lon)
        self.lats.append(lat)
        text = sample[CAPTION_EXT].decode()
        self.words.append(len(text.split()))
        try:
            cap = parse_caption(text)
        except CaptionError:
            self.unparsed += 1
            return
        for f, kw in cap.clauses.items():
            self.clauses[f] += 1
            if f in FIELDS:
                self.keywords[f][kw] += 1


def _open_tar(index, name: str) -> tarfile.TarFile:
    """A shard as a tar: the file, or the object read whole from object storage."""
    if index.store.remote:
        return tarfile.open(fileobj=io.BytesIO(index.store.read(name)))
    return tarfile.open(index.store.path(name))


def inspect_shards(root: str, storage=None) -> dict:
    """Read every sample once (with the standard tarfile reader, independent of our index offsets).
    A damaged shard is reported with what could be read of it, not fatal."""
    index = load_index(root, storage)
    stats, damaged = _Stats(), []
    for shard in index.shards:
        before = stats.samples
        try:
            with _open_tar(index, shard.name) as tar:
                for sample in _samples(tar):
                    stats.add(sample)
        except (tarfile.TarError, ValueError, KeyError, UnicodeDecodeError) as exc:
            damaged.append(f"{shard.name}: {type(exc).__name__}: {exc}")
            continue
        read = stats.samples - before
        if read != shard.samples:  # tarfile stops quietly at a bad header in mid-archive
            damaged.append(f"{shard.name}: read {read} of {shard.samples} samples (damaged after sample {read})")
    s = stats
    return {
        "root": str(index.root),
        "shards": index.num_shards,
        "samples": s.samples,
        "samples_in_index": index.total_samples,
        "damaged_shards": damaged,
        "bands": dict(s.bands),
        "dtypes": dict(s.dtypes),
        "chip_shapes": dict(s.shapes),
        "products": dict(s.products),
        "crs": dict(s.crs),
        "extent_lonlat": [min(s.lons), min(s.lats), max(s.lons), max(s.lats)] if s.lons else None,
        "caption_words_mean": round(float(np.mean(s.words)), 1) if s.words else 0.0,
        "captions_without_all_clauses": s.unparsed,
        "clause_counts": dict(s.clauses),
        "top_keywords": {f: s.keywords[f].most_common(3) for f in FIELDS if s.keywords[f]},
        "pack_report": {k: v for k, v in index.info.get("report", {}).items() if k in
                        ("scenes_packed", "skipped_files", "caption_errors", "chips_without_caption")},
    }


def _samples(tar: tarfile.TarFile):
    """Group consecutive members by key, as a webdataset reader does."""
    current, key = {}, None
    for member in tar:
        k, _, ext = member.name.partition(".")
        if key is not None and k != key:
            yield current
            current = {}
        key = k
        current[ext] = tar.extractfile(member).read()
    if current:
        yield current


def format_report(r: dict) -> str:
    lines = [
        f"{r['root']}: {r['samples']} samples in {r['shards']} shards",
        f"  bands: {r['bands']}   dtypes: {r['dtypes']}   chips: {r['chip_shapes']}",
        f"  products: {r['products']}   crs: {r['crs']}",
        f"  extent (lon/lat): {r['extent_lonlat']}",
        f"  captions: {r['caption_words_mean']} words on average, {r['captions_without_all_clauses']} "
        f"without the eight clauses",
        f"  clause counts: {r['clause_counts']}",
    ]
    for f, top in r["top_keywords"].items():
        lines.append(f"    {f}: " + "; ".join(f"{kw} ({n})" for kw, n in top))
    for damaged in r["damaged_shards"]:
        lines.append(f"  DAMAGED {damaged}")
    rep = r["pack_report"]
    if rep:
        lines.append(f"  pack: {rep.get('scenes_packed')} scenes, {len(rep.get('skipped_files', []))} files skipped, "
                     f"{rep.get('chips_without_caption', 0)} chips without caption, "
                     f"{len(rep.get('caption_errors', []))} caption errors")
    return "\n".join(lines)
