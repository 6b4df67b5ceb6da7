"""The structured caption of method.md: eight templated clauses plus an optional geographic clause.

A clause is its template prefix followed by keywords ("Road presence: a major road crossing east-west.").
The keywords are what the reconstruction loss masks, so `keyword_spans` gives their character spans.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from knowlip.choices import CAPTION_FIELDS

# (field, template prefix), in caption order.
CLAUSES: tuple[tuple[str, str], ...] = tuple(zip(CAPTION_FIELDS, (
    "The terrain is classified as",
    "The area functionality is described as",
    "Functional distribution:",
    "Spatial layout:",
    "Boundary features:",
    "Building presence:",
    "Road presence:",
    "Water presence:",
), strict=True))
GEO_FIELD, GEO_PREFIX = "geo", "Located at"
FIELDS = CAPTION_FIELDS
_PREFIX = dict(CLAUSES) | {GEO_FIELD: GEO_PREFIX}


class CaptionError(ValueError):
    """A caption that does not parse into the eight clauses."""


@dataclass(frozen=True)
class Caption:
    clauses: dict[str, str]  # field -> keywords, in CLAUSES order (geo last when present)

    def text(self) -> str:
        return " ".join(clause_text(f, kw) for f, kw in self.clauses.items())

    def without(self, field: str) -> "Caption":
        return Caption({f: kw for f, kw in self.clauses.items() if f != field})

    def keyword_spans(self) -> list[tuple[str, int, int]]:
        """(field, start, end) character spans of each clause's keywords within `text()`."""
        spans, pos = [], 0
        for f, kw in self.clauses.items():
            start = pos + len(_PREFIX[f]) + 1
            spans.append((f, start, start + len(kw)))
            pos = start + len(kw) + 2  # the period and the space
        return spans


def make_caption(clauses: dict[str, str], geo: str | None = None) -> Caption:
    missing = [f for f in FIELDS if not clauses.get(f)]
    if missing:
        raise CaptionError(f"caption lacks clauses: {', '.join(missing)}")
    ordered = {f: _clean(clauses[f]) for f in FIELDS}
    if geo:
        ordered[GEO_FIELD] = _clean(geo)
    return Caption(ordered)


def clause_text(field: str, keywords: str) -> str:
    """One clause as it reads in a caption: 'Water presence: no water.'"""
    return f"{_PREFIX[field]} {keywords}."


def _clean(keywords: str) -> str:
    return " ".join(keywords.split()).rstrip(".")


_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in _PREFIX.values()) + ")")


def parse_caption(text: str) -> Caption:
    """Split a caption into its clauses; raises CaptionError naming what is wrong."""
    parts = _SPLIT.split(" ".join(text.split()))
    if parts[0].strip():
        raise CaptionError(f"text before the first clause: {parts[0].strip()[:60]!r}")
    by_prefix = {p: f for f, p in _PREFIX.items()}
    found: dict[str, str] = {}
    for prefix, body in zip(parts[1::2], parts[2::2]):
        field = by_prefix[prefix]
        if field in found:
            raise CaptionError(f"clause '{field}' appears twice")
        keywords = body.strip().rstrip(".").strip()
        if not keywords:
            raise CaptionError(f"clause '{field}' has no keywords")
        found[field] = keywords
    order = [f for f in found if f != GEO_FIELD]
    if order != [f for f in FIELDS if f in found]:
        raise CaptionError("clauses out of order")
    return make_caption(found, found.get(GEO_FIELD))


def geo_clause(meta: dict) -> str:
    """'43.5944N 4.5204E (EPSG:32631), imaged by S1A VV on 2015-03-09' from a chip's metadata."""
    lon, lat = meta["center_lonlat"]
    text = f"{abs(lat):.4f}{'N' if lat >= 0 else 'S'} {abs(lon):.4f}{'E' if lon >= 0 else 'W'}"
    crs = meta.get("crs", "")
    if crs.startswith("EPSG:"):
        text += f" ({crs})"
    sensor = meta.get("sensor")
    pols = "+".join(meta.get("polarisations") or [])
    if sensor or pols:
        text += ", imaged by " + " ".join(x for x in (sensor, pols) if x)
    if meta.get("acquisition_time"):
        text += f" on {meta['acquisition_time'][:10]}"
    return text


class CaptionIndex:
    """Captions from a JSONL file keyed by chip or scene id: {"id": ..., "caption": "..."} or
    {"id": ..., "clauses": {"terrain": ..., ...}}. Lookup tries the chip id first, then its scene id.

    A record may say what is known of its caption's truth (`knowlip synth` writes it): "noise": null for a true
    caption, {"field": F, "original": TEXT} when clause F was corrupted and TEXT is its true keywords."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.by_id: dict[str, Caption] = {}
        self.noise_by_id: dict[str, dict | None] = {}  # only the records that carry "noise"
        self.errors: list[str] = []
        if self.path:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: caption file not found")
        with self.path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    record = json.loads(line)
                    key = str(record["id"])
                    if "clauses" in record:
                        cap = make_caption(record["clauses"], record["clauses"].get(GEO_FIELD))
                    else:
                        cap = parse_caption(record["caption"])
                    if "noise" in record:
                        self.noise_by_id[key] = _checked_noise(record["noise"])
                except (json.JSONDecodeError, KeyError, TypeError, CaptionError) as exc:
                    self.errors.append(f"{where}: {type(exc).__name__}: {exc}")
                    continue
                self.by_id[key] = cap

    def lookup(self, chip_id: str, scene_id: str) -> Caption | None:
        return self.by_id.get(chip_id) or self.by_id.get(scene_id)

    def truth(self, chip_id: str, scene_id: str) -> tuple[bool, dict | None]:
        """(whether the caption `lookup` finds has a known truth, its noise record: None when it is true)."""
        key = chip_id if chip_id in self.by_id else scene_id
        return key in self.noise_by_id, self.noise_by_id.get(key)


def _checked_noise(noise) -> dict | None:
    """A caption's noise record as `knowlip synth` writes it; CaptionError when it is anything else."""
    if noise is None:
        return None
    if not isinstance(noise, dict) or noise.get("field") not in FIELDS or not isinstance(noise.get("original"), str) \
            or not noise["original"].strip():
        raise CaptionError(f"'noise' must be null or {{\"field\": one of {', '.join(FIELDS)}, \"original\": "
                           f"its true keywords}}, not {str(noise)[:80]!r}")
    return {"field": noise["field"], "original": _clean(noise["original"])}
