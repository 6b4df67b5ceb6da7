"""A synthetic SAR world: land-cover maps rendered as speckled backscatter, written as real GeoTIFFs.

Each scene's caption is derived from its realised land-cover map (class fractions, where each class lies,
which features exist), so a model can learn to retrieve captions from pixels. Everything is a pure function
of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from knowlip.sar.geotiff import chip_grid, chip_id
from knowlip.text.caption import FIELDS as CAPTION_FIELDS
from knowlip.text.caption import make_caption

WATER, VEGETATION, FIELDS, URBAN, ROAD = range(5)
# Mean backscatter (dB) per class for VV; VH is lower, least so for vegetation (volume scattering).
MEAN_DB_VV = {WATER: -22.0, VEGETATION: -10.0, FIELDS: -15.0, URBAN: -5.0, ROAD: -19.0}
VH_OFFSET_DB = {WATER: -8.0, VEGETATION: -6.0, FIELDS: -8.0, URBAN: -9.0, ROAD: -8.0}
BRIGHT_TARGET_DB = 10.0
DN_GAIN = 1e-6  # uint16 products: intensity = DN_GAIN * DN**2

# Places spread over both hemispheres and several UTM zones (lon, lat).
PLACES = (
    ("Arles", 4.63, 43.68), ("Shanghai", 121.47, 31.23), ("Sao Paulo", -46.63, -23.55),
    ("Cairo", 31.24, 30.04), ("Sydney", 151.21, -33.87), ("Chicago", -87.63, 41.88),
    ("Mumbai", 72.88, 19.08), ("Nairobi", 36.82, -1.29), ("Oslo", 10.75, 59.91),
    ("Lima", -77.04, -12.05), ("Wuhan", 114.31, 30.59), ("Perth", 115.86, -31.95),
)


@dataclass
class SceneSpec:
    water: str  # none | river_ns | river_ew | lake
    urban: str  # none | sparse | dense
    urban_quadrant: tuple[float, float]  # (row, col) centre as fractions of the scene
    roads: str  # none | ew | ns | both
    fields_side: str  # none | north | south | west | east | all


def random_spec(rng: np.random.Generator) -> SceneSpec:
    return SceneSpec(
        water=str(rng.choice(["none", "river_ns", "river_ew", "lake"])),
        urban=str(rng.choice(["none", "sparse", "dense"])),
        urban_quadrant=(float(rng.choice([0.25, 0.75])), float(rng.choice([0.25, 0.75]))),
        roads=str(rng.choice(["none", "ew", "ns", "both"])),
        fields_side=str(rng.choice(["none", "north", "south", "west", "east", "all"])),
    )


# ----------------------------------------------------------------------------------------------------------
# Land cover
# ----------------------------------------------------------------------------------------------------------


def land_cover(spec: SceneSpec, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class map (H, W) uint8 and a boolean map of bright point targets (buildings)."""
    cls = np.full((size, size), VEGETATION, np.uint8)
    rows, cols = np.mgrid[0:size, 0:size] / size
    _draw_fields(cls, spec.fields_side, size, rng)
    bright = np.zeros((size, size), bool)
    if spec.urban != "none":
        r0, c0 = spec.urban_quadrant
        radius = 0.22 if spec.urban == "dense" else 0.17
        blob = ((rows - r0) ** 2 + (cols - c0) ** 2) < radius**2
        cls[blob] = URBAN
        density = 0.04 if spec.urban == "dense" else 0.008
        bright = blob & (rng.random((size, size)) < density)
    if spec.roads in ("ew", "both"):
        r = int(rng.uniform(0.35, 0.65) * size)
        cls[r : r + 3, :] = ROAD
    if spec.roads in ("ns", "both"):
        c = int(rng.uniform(0.35, 0.65) * size)
        cls[:, c : c + 3] = ROAD
    _draw_water(cls, spec.water, rows, cols, rng)
    bright &= cls == URBAN
    return cls, bright


def _draw_fields(cls: np.ndarray, side: str, size: int, rng: np.random.Generator) -> None:
    if side == "none":
        return
    half = size // 2
    region = {"north": (0, half, 0, size), "south": (half, size, 0, size), "west": (0, size, 0, half),
              "east": (0, size, half, size), "all": (0, size, 0, size)}[side]
    r0, r1, c0, c1 = region
    step = max(8, size // 8)
    for r in range(r0, r1, step):
        for c in range(c0, c1, step):
            if rng.random() < 0.85:  # most parcels are bare/cropped fields, some stay vegetated
                cls[r : r + step - 1, c : c + step - 1] = FIELDS


def _draw_water(cls: np.ndarray, kind: str, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> None:
    if kind == "none":
        return
    phase, centre = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.7)
    if kind == "river_ns":
        axis = centre + 0.08 * np.sin(2 * np.pi * rows * 1.5 + phase)
        cls[np.abs(cols - axis) < 0.05] = WATER
    elif kind == "river_ew":
        axis = centre + 0.08 * np.sin(2 * np.pi * cols * 1.5 + phase)
        cls[np.abs(rows - axis) < 0.05] = WATER
    else:
        lake = ((rows - centre) / 0.2) ** 2 + ((cols - (1 - centre)) / 0.28) ** 2 < 1
        cls[lake] = WATER


# ----------------------------------------------------------------------------------------------------------
# Captions from the realised map
# ----------------------------------------------------------------------------------------------------------

_CLASS_WORDS = {WATER: "open water", VEGETATION: "natural vegetation", FIELDS: "agricultural cropland",
                URBAN: "residential and commercial land"}


def _where(mask: np.ndarray) -> str:
    size = mask.shape[0]
    r, c = np.argwhere(mask).mean(axis=0) / size
    ns = "north" if r < 0.4 else "south" if r > 0.6 else ""
    ew = "west" if c < 0.4 else "east" if c > 0.6 else ""
    return f"{ns}-{ew}" if ns and ew else ns or ew or "centre"


def caption_clauses(cls: np.ndarray, bright: np.ndarray, spec: SceneSpec) -> dict[str, str]:
    """The eight clauses for a (window of a) land-cover map: everything is measured on `cls` itself."""
    frac = {k: float((cls == k).mean()) for k in (WATER, VEGETATION, FIELDS, URBAN, ROAD)}
    ranked = sorted(_CLASS_WORDS, key=lambda k: -frac[k])
    terrain = {
        WATER: "a low-lying floodplain dominated by water",
        VEGETATION: "a vegetated lowland",
        FIELDS: "a flat agricultural plain",
        URBAN: "an urbanised plain",
    }[ranked[0]]
    present = [k for k in ranked if frac[k] > 0.05]
    functionality = " and ".join(_CLASS_WORDS[k] for k in present[:2])
    distribution = ", ".join(f"{_CLASS_WORDS[k]} in the {_where(cls == k)}" for k in present if k != VEGETATION)
    distribution = distribution or "natural vegetation across the whole scene"
    urban_pixels = int((cls == URBAN).sum())
    dense = urban_pixels > 0 and bright.sum() / urban_pixels > 0.02
    if frac[FIELDS] > 0.15:
        layout = "a regular grid of rectangular parcels"
    elif frac[URBAN] > 0.05:
        layout = "compact built-up blocks" if dense else "scattered settlements"
    else:
        layout = "continuous natural cover"
    if frac[WATER] > 0.02:
        boundary = "sharp dark land-water edges along the " + ("lake shore" if spec.water == "lake" else "river banks")
    elif frac[FIELDS] > 0.15:
        boundary = "straight parcel edges"
    else:
        boundary = "gradual transitions without sharp edges"
    if not bright.any():
        buildings = "no buildings"
    else:
        buildings = "dense buildings with many bright point scatterers" if dense else "sparse isolated buildings"
    road = cls == ROAD
    ew, ns = bool((road.mean(axis=1) > 0.5).any()), bool((road.mean(axis=0) > 0.5).any())
    roads = {(False, False): "no roads", (True, False): "one road crossing east-west",
             (False, True): "one road crossing north-south",
             (True, True): "two roads crossing north-south and east-west"}[(ew, ns)]
    if frac[WATER] <= 0.02:
        water = "no water"
    else:
        water = {"river_ns": "a river flowing north-south", "river_ew": "a river flowing east-west",
                 "lake": f"a lake in the {_where(cls == WATER)}"}[spec.water]
        water += f" covering about {round(100 * frac[WATER])} percent"
    return {"terrain": terrain, "functionality": functionality, "distribution": distribution, "layout": layout,
            "boundary": boundary, "buildings": buildings, "roads": roads, "water": water}


# ----------------------------------------------------------------------------------------------------------
# Rendering and writing
# ----------------------------------------------------------------------------------------------------------


def render_intensity(cls: np.ndarray, bright: np.ndarray, pol: str, looks: float, rng: np.random.Generator) -> np.ndarray:
    """Linear intensity with gamma speckle around class-dependent means."""
    mean_db = np.zeros(cls.shape, np.float32)
    for k, db in MEAN_DB_VV.items():
        mean_db[cls == k] = db + (VH_OFFSET_DB[k] if pol in ("VH", "HV") else 0.0)
    mean_db[bright] = BRIGHT_TARGET_DB + (VH_OFFSET_DB[URBAN] if pol in ("VH", "HV") else 0.0)
    mean_db += rng.normal(0.0, 0.7, cls.shape).astype(np.float32)  # texture
    speckle = rng.gamma(looks, 1.0 / looks, cls.shape).astype(np.float32)
    return (10.0 ** (mean_db / 10.0) * speckle).astype(np.float32)


def encode_product(intensity: np.ndarray, product: str, rng: np.random.Generator) -> np.ndarray:
    """Turn linear intensity (C, H, W) into the stored representation of `product`."""
    if product == "intensity":
        return intensity
    if product == "amplitude":
        return np.sqrt(intensity).astype(np.float32)
    if product == "db":
        return (10.0 * np.log10(intensity)).astype(np.float32)
    if product == "complex":
        phase = rng.uniform(-np.pi, np.pi, intensity.shape)
        return (np.sqrt(intensity) * np.exp(1j * phase)).astype(np.complex64)
    if product == "dn":
        return np.clip(np.round(np.sqrt(intensity / DN_GAIN)), 1, 65535).astype(np.uint16)
    raise ValueError(f"unknown product {product!r}")


def utm_crs(lon: float, lat: float) -> str:
    zone = int((lon + 180) // 6) + 1
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def write_scene(path: Path, data: np.ndarray, product: str, pols: list[str], lon: float, lat: float,
                spacing: float, acquired: str) -> None:
    crs = utm_crs(lon, lat)
    xs, ys = warp_transform("EPSG:4326", crs, [lon], [lat])
    size = data.shape[-1]
    transform = from_origin(xs[0] - size * spacing / 2, ys[0] + size * spacing / 2, spacing, spacing)
    nodata = {"db": -99.0, "complex": None}.get(product, 0)
    profile = dict(driver="GTiff", width=size, height=size, count=data.shape[0], dtype=data.dtype.name, crs=crs,
                   transform=transform, nodata=nodata, tiled=True, blockxsize=128, blockysize=128,
                   compress="deflate")
    tags = {"KNOWLIP_PRODUCT": product, "SENSOR": "SYNTH-SAR", "ACQUISITION_START_TIME": acquired}
    if product == "dn":
        tags["CALIBRATION_GAIN"] = repr(DN_GAIN)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(**tags)
        for i, pol in enumerate(pols, 1):
            dst.set_band_description(i, pol)


def add_swath_edge(data: np.ndarray, product: str, rng: np.random.Generator) -> None:
    """Blank a corner triangle with nodata, as at the edge of a real swath."""
    size = data.shape[-1]
    rows, cols = np.mgrid[0:size, 0:size]
    cut = rng.uniform(0.2, 0.5) * size
    edge = rows + cols < cut
    data[:, edge] = {"db": -99.0, "complex": 0}.get(product, 0)


def synthesise(out_dir: str | Path, num_scenes: int, size: int, seed: int, polarisations: list[str],
               products: list[str], looks: float = 4.0, spacing: float = 10.0,
               chip_size: int | None = None, chip_stride: int | None = None, caption_noise: float = 0.0,
               noise_clauses: Sequence[str] = CAPTION_FIELDS) -> list[Path]:
    """Write `num_scenes` GeoTIFFs and captions.jsonl into out_dir; returns the scene paths.

    captions.jsonl holds one caption per scene and, when a chip grid is given, one per chip (keyed by the chip
    id `knowlip pack` will give it), each measured on that chip's own window of the land-cover map. Every record
    says whether its caption is true ("noise": null) or which clause `caption_noise` corrupted (add_caption_noise).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, records, samples = [], [], []
    for i in range(num_scenes):
        rng = np.random.default_rng([seed, i])
        spec = random_spec(rng)
        cls, bright = land_cover(spec, size, rng)
        intensity = np.stack([render_intensity(cls, bright, p, looks, rng) for p in polarisations])
        product = products[i % len(products)]
        data = encode_product(intensity, product, rng)
        if rng.random() < 0.3:
            add_swath_edge(data, product, rng)
        name, lon, lat = PLACES[i % len(PLACES)]
        lon, lat = lon + rng.uniform(-0.2, 0.2), lat + rng.uniform(-0.2, 0.2)
        acquired = f"20{15 + i % 10:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:30:00Z"
        scene_id = f"synth_{seed:04d}_{i:05d}_{'_'.join(polarisations)}_{product}"
        path = out_dir / f"{scene_id}.tif"
        write_scene(path, data, product, polarisations, lon, lat, spacing, acquired)
        records.append({"id": scene_id, "clauses": caption_clauses(cls, bright, spec)})
        chips = []
        for r, c in chip_grid(size, size, chip_size or 0, chip_stride or 0):
            window = (slice(r, r + chip_size), slice(c, c + chip_size))
            chips.append({"id": chip_id(scene_id, r, c), "clauses": caption_clauses(cls[window], bright[window], spec)})
        records += chips
        samples += chips or records[-1:]  # what `knowlip pack` makes samples of: the chips, else the scene
        paths.append(path)
    add_caption_noise(samples, caption_noise, list(noise_clauses), seed)
    for rec in records:
        rec["caption"] = make_caption(rec.pop("clauses")).text()
        rec.setdefault("noise", None)
    with (out_dir / "captions.jsonl").open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return paths


def add_caption_noise(records: list[dict], rate: float, fields: list[str], seed: int) -> None:
    """Corrupt round(rate x len(records)) of the records, chosen at random, in place: one clause of `fields`
    gets another value that the same field takes elsewhere in `records` (a plausible wrong clause, not a
    made-up one), and record["noise"] = {"field", "original"} keeps the truth. A pure function of the seed."""
    if rate <= 0:
        return
    if not fields:
        raise ValueError("synth.noise_clauses is empty: caption noise needs at least one field to corrupt")
    values = {f: sorted({rec["clauses"][f] for rec in records}) for f in fields}
    rng = np.random.default_rng([seed, 0x5C10])  # its own stream: the scenes do not change with the noise
    for i in sorted(rng.choice(len(records), size=round(rate * len(records)), replace=False)):
        clauses = records[i]["clauses"]
        corruptible = [f for f in fields if len(values[f]) > 1]
        if not corruptible:
            raise ValueError(f"no field of {fields} takes two values in this world: nothing to corrupt it with")
        field = corruptible[rng.integers(len(corruptible))]
        others = [v for v in values[field] if v != clauses[field]]
        records[i]["noise"] = {"field": field, "original": clauses[field]}
        records[i]["clauses"] = {**clauses, field: others[rng.integers(len(others))]}


def synthesise_from_config(cfg) -> list[Path]:
    """`synthesise` with the `synth` section, writing per-chip captions for the `pack.chip` grid."""
    s = cfg.synth
    return synthesise(s.out_dir, s.num_scenes, s.size, s.seed, list(s.polarisations), list(s.products), s.looks,
                      s.pixel_spacing_m, cfg.pack.chip.size, cfg.pack.chip.stride, s.caption_noise,
                      list(s.noise_clauses))
