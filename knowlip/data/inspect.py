"""`knowlip data inspect`: what a shard folder holds (counts, bands, dtypes, extent, caption statistics)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict

import numpy as np

from knowlip.data.shards import CAPTION_EXT, CHIP_EXT, META_EXT, load_index
from knowlip.text.caption import FIELDS, CaptionError, parse_caption


def inspect_shards(root: str) -> dict:
    """Read every sample once (with the standard tarfile reader, independent of our index offsets)."""
    index = load_index(root)
    bands, dtypes, shapes, products, crs = Counter(), Counter(), Counter(), Counter(), Counter()
    clause_count: Counter = Counter()
    keywords: dict[str, Counter] = defaultdict(Counter)
    words, unparsed, samples = [], 0, 0
    lons, lats = [], []
    for shard in index.shards:
        with tarfile.open(index.path(shard)) as tar:
            for sample in _samples(tar):
                samples += 1
                meta = json.loads(sample[META_EXT])
                header = _npy_header(sample[CHIP_EXT])
                bands["+".join(meta["polarisations"])] += 1
                dtypes[header["descr"]] += 1
                shapes["x".join(map(str, header["shape"]))] += 1
                products[meta["product"]] += 1
                crs[meta["crs"] if meta["crs"].startswith("EPSG") else "WKT"] += 1
                lon, lat = meta["center_lonlat"]
                lons.append(lon)
                lats.append(lat)
                text = sample[CAPTION_EXT].decode()
                words.append(len(text.split()))
                try:
                    cap = parse_caption(text)
                except CaptionError:
                    unparsed += 1
                    continue
                for f, kw in cap.clauses.items():
                    clause_count[f] += 1
                    if f in FIELDS:
                        keywords[f][kw] += 1
    return {
        "root": str(index.root),
        "shards": len(index.shards),
        "samples": samples,
        "samples_in_index": index.total_samples,
        "bands": dict(bands),
        "dtypes": dict(dtypes),
        "chip_shapes": dict(shapes),
        "products": dict(products),
        "crs": dict(crs),
        "extent_lonlat": [min(lons), min(lats), max(lons), max(lats)] if lons else None,
        "caption_words_mean": round(float(np.mean(words)), 1) if words else 0.0,
        "captions_without_all_clauses": unparsed,
        "clause_counts": dict(clause_count),
        "top_keywords": {f: keywords[f].most_common(3) for f in FIELDS if keywords[f]},
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


def _npy_header(raw: bytes) -> dict:
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(buf)
    return {"shape": list(shape), "descr": str(dtype)}


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
    rep = r["pack_report"]
    if rep:
        lines.append(f"  pack: {rep.get('scenes_packed')} scenes, {len(rep.get('skipped_files', []))} files skipped, "
                     f"{rep.get('chips_without_caption', 0)} chips without caption, "
                     f"{len(rep.get('caption_errors', []))} caption errors")
    return "\n".join(lines)
