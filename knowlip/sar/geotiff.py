"""Reading georeferenced SAR rasters with rasterio, and tiling them into georeferenced chips.

A chip keeps its native values (linear intensity, amplitude, complex, uint16 DN or dB): turning them into
normalised log-intensity is the device kernel's job (knowlip.ops.sar_norm). Invalid pixels (nodata, masked,
non-finite) are written as a fill that the kernel recognises as invalid: NaN for float products, 0 for
integer and complex products (zero intensity is never valid).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio._err import CPLE_BaseError  # GDAL errors rasterio does not wrap (not exported elsewhere)
from rasterio.errors import RasterioError, RasterioIOError

from knowlip.choices import SAR_PRODUCTS

PRODUCTS = SAR_PRODUCTS
POLARISATIONS = ("VV", "VH", "HH", "HV")
TIFF_SUFFIXES = (".tif", ".tiff", ".gtiff")


class SarReadError(ValueError):
    """A file that cannot be used as a georeferenced SAR raster; the message names the file."""


@dataclass
class SceneInfo:
    """What a scene is and where it lies; everything a chip's metadata derives from."""

    path: str
    scene_id: str
    width: int
    height: int
    count: int
    dtype: str
    product: str
    polarisations: list[str]
    crs: str  # "EPSG:32631" where the CRS has an EPSG code, else WKT
    transform: list[float]  # affine a, b, c, d, e, f
    bounds: list[float]  # left, bottom, right, top in CRS units
    pixel_spacing_m: list[float]  # x, y
    center_lonlat: list[float]
    nodata: float | None
    acquisition_time: str | None = None
    sensor: str | None = None
    orbit: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)

    def affine(self) -> Affine:
        return Affine(*self.transform)


@dataclass
class Chip:
    chip_id: str
    data: np.ndarray  # (C, H, W), native dtype
    valid_fraction: float
    meta: dict


# ----------------------------------------------------------------------------------------------------------
# Scene metadata
# ----------------------------------------------------------------------------------------------------------


def open_scene(path: str | Path, product: str = "auto", band_names: Sequence[str] = ()) -> SceneInfo:
    """Read a raster's header and georeference; raises SarReadError naming the file when it is unusable."""
    with _open_raster(path) as src:
        return _scene_info(src, Path(path), product, band_names)


@contextmanager
def _open_raster(path: str | Path):
    """rasterio.open whose I/O errors (at open or while reading) become SarReadError naming the file."""
    try:
        with rasterio.open(path) as src:
            yield src
    except RasterioIOError as exc:
        raise SarReadError(f"{path}: not a readable raster ({_short(exc)})") from exc
    except (RasterioError, CPLE_BaseError) as exc:  # e.g. a georeference GDAL cannot transform
        raise SarReadError(f"{path}: GDAL could not read it ({type(exc).__name__}: {_short(exc)})") from exc
    except MemoryError as exc:
        raise SarReadError(f"{path}: reading it needs more memory than there is ({_short(exc)})") from exc


def _scene_info(src, path: Path, product: str, band_names: Sequence[str]) -> SceneInfo:
    if src.crs is None:
        raise SarReadError(f"{path}: has no CRS (not georeferenced); knowlip needs a georeferenced raster")
    if src.transform.is_identity:
        raise SarReadError(f"{path}: has an identity geotransform (not georeferenced)")
    tags = {k.upper(): v for k, v in src.tags().items()}
    name = path.name
    epsg = src.crs.to_epsg()
    crs = f"EPSG:{epsg}" if epsg else src.crs.to_wkt()
    left, bottom, right, top = src.bounds
    return SceneInfo(
        path=str(path),
        scene_id=_scene_id(path),
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=src.dtypes[0],
        product=_product(src, tags, name, product),
        polarisations=_polarisations(src, tags, name, band_names),
        crs=crs,
        transform=list(src.transform)[:6],
        bounds=[left, bottom, right, top],
        pixel_spacing_m=_pixel_spacing_m(src.crs, src.transform, (left + right) / 2, (bottom + top) / 2),
        center_lonlat=_to_lonlat(src.crs, (left + right) / 2, (bottom + top) / 2),
        nodata=src.nodata,
        acquisition_time=_acquisition_time(tags, name),
        sensor=tags.get("SENSOR") or tags.get("MISSION") or _match(r"(S1[ABCD]|GF3|RS2|TSX|ICEYE|CSK)", name),
        orbit=tags.get("ORBIT") or {"A": "ascending", "D": "descending"}.get(_match(r"_(A|D)_", name) or ""),
        extra_tags={k: v for k, v in tags.items() if k != "AREA_OR_POINT"},
    )


def _scene_id(path: Path) -> str:
    stem = path.name
    for suffix in TIFF_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_-]", "-", stem)


def _product(src, tags: dict, name: str, requested: str) -> str:
    if requested != "auto":
        return requested
    tagged = (tags.get("KNOWLIP_PRODUCT") or tags.get("PRODUCT") or "").lower()
    if tagged in PRODUCTS:
        return tagged
    dtype = src.dtypes[0]
    if dtype.startswith("complex"):
        return "complex"
    if dtype in ("uint16", "uint8"):
        return "dn"
    lname = name.lower()
    if re.search(r"(^|[_.-])db([_.-]|$)", lname):
        return "db"
    if re.search(r"(^|[_.-])(amp|amplitude)([_.-]|$)", lname):
        return "amplitude"
    return "intensity"


def _polarisations(src, tags: dict, name: str, band_names: Sequence[str]) -> list[str]:
    if band_names:
        if len(band_names) != src.count:
            raise SarReadError(f"{src.name}: {src.count} bands but {len(band_names)} band names in config")
        return [b.upper() for b in band_names]
    found = []
    for i in range(1, src.count + 1):
        desc = (src.descriptions[i - 1] or src.tags(i).get("POLARISATION") or src.tags(i).get("POLARIZATION") or "")
        found.append(desc.upper())
    if all(p in POLARISATIONS for p in found):
        return found
    from_tags = (tags.get("POLARISATIONS") or tags.get("POLARIZATIONS") or "").replace(",", " ").split()
    if len(from_tags) == src.count:
        return [p.upper() for p in from_tags]
    in_name = re.findall(r"(?:^|_)(VV|VH|HH|HV)(?=_|$)", Path(name).stem.upper())
    if len(in_name) == src.count:
        return in_name
    return [p or f"B{i + 1}" for i, p in enumerate(found)]


def _acquisition_time(tags: dict, name: str) -> str | None:
    for key in ("ACQUISITION_START_TIME", "ACQUISITION_TIME", "TIFFTAG_DATETIME", "DATETIME"):
        if tags.get(key):
            return tags[key]
    m = re.search(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})", name)
    return f"{m[1]}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}Z" if m else None


def _match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _to_lonlat(crs, x: float, y: float) -> list[float]:
    lon, lat = rasterio.warp.transform(crs, "EPSG:4326", [x], [y])
    return [float(lon[0]), float(lat[0])]


def _pixel_spacing_m(crs, transform, cx: float, cy: float) -> list[float]:
    dx, dy = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs.is_geographic:  # degrees: convert at the scene centre
        lat = math.radians(_to_lonlat(crs, cx, cy)[1])
        metres_per_degree = 111_320.0
        return [dx * metres_per_degree * math.cos(lat), dy * metres_per_degree]
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return [dx * factor, dy * factor]


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


# ----------------------------------------------------------------------------------------------------------
# Chips
# ----------------------------------------------------------------------------------------------------------


def invalid_fill(dtype: np.dtype) -> float | complex:
    """The value an invalid pixel takes in a stored chip (recognised as invalid by the normaliser)."""
    return np.nan if np.issubdtype(dtype, np.floating) else 0


def chip_starts(length: int, size: int, stride: int) -> range:
    """Offsets of every full chip along one axis."""
    return range(0, length - size + 1, stride)


def chip_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every full chip, row-major. size 0 means no grid."""
    if size <= 0:
        return []
    return [(r, c) for r in chip_starts(height, size, stride) for c in chip_starts(width, size, stride)]


def chip_id(scene_id: str, row: int, col: int) -> str:
    return f"{scene_id}_r{row:05d}_c{col:05d}"


def iter_chips(
    path: str | Path,
    size: int,
    stride: int,
    min_valid_fraction: float,
    product: str = "auto",
    band_names: Sequence[str] = (),
    max_values: int | None = None,
) -> Iterator[Chip]:
    """Tile one scene into chips, reading one strip of chip rows at a time: memory is bounded by
    size x scene width, and GDAL's per-read overhead is paid once per strip rather than once per chip. A scene
    of more than `max_values` values (width x height x bands) is refused before any pixel is read."""
    with _open_raster(path) as src:
        info = _scene_info(src, Path(path), product, band_names)
        values = info.width * info.height * info.count
        if max_values is not None and values > max_values:
            raise SarReadError(f"{path}: {info.width} x {info.height} pixels x {info.count} band(s) = {values:,} "
                               f"values, over pack.max_scene_values={max_values:,} (a damaged header, or raise "
                               "the limit)")
        cols = list(chip_starts(info.width, size, stride))
        for row in chip_starts(info.height, size, stride):
            strip, strip_valid = _read_window(src, rasterio.windows.Window(0, row, info.width, size), info)
            for col, centre in zip(cols, _chip_centres_lonlat(info, row, cols, size)):
                fraction = float(strip_valid[:, col : col + size].mean())
                if fraction < min_valid_fraction:
                    continue
                window = rasterio.windows.Window(col, row, size, size)
                data = np.ascontiguousarray(strip[:, :, col : col + size])
                meta = chip_meta(info, src.window_transform(window), window, fraction, centre)
                yield Chip(chip_id(info.scene_id, row, col), data, fraction, meta)


def _read_window(src, window, info: SceneInfo) -> tuple[np.ndarray, np.ndarray]:
    data = src.read(window=window)
    masks = src.read_masks(window=window)  # GDAL masks already honour nodata
    valid = np.all(masks > 0, axis=0)
    if np.issubdtype(data.dtype, np.inexact):  # float or complex
        valid &= np.all(np.isfinite(data), axis=0)
    if info.nodata is not None and not (isinstance(info.nodata, float) and math.isnan(info.nodata)):
        valid &= np.all(data != info.nodata, axis=0)
    data = np.ascontiguousarray(data)
    data[:, ~valid] = invalid_fill(data.dtype)
    return data, valid


def _chip_centres_lonlat(info: SceneInfo, row: int, cols: list[int], size: int) -> list[list[float]]:
    """WGS84 centres of a strip's chips, in one reprojection call."""
    if not cols:
        return []
    pixel_to_crs = info.affine()
    xs, ys = zip(*(pixel_to_crs @ (c + size / 2, row + size / 2) for c in cols))
    lons, lats = rasterio.warp.transform(info.crs, "EPSG:4326", list(xs), list(ys))
    return [[float(lon), float(lat)] for lon, lat in zip(lons, lats)]


def chip_meta(info: SceneInfo, transform, window, valid_fraction: float, center_lonlat: list[float]) -> dict:
    """A chip's own georeference plus what it inherits from its scene."""
    left, bottom, right, top = rasterio.windows.bounds(window, info.affine())
    return {
        "scene_id": info.scene_id,
        "source": Path(info.path).name,
        "window": [int(window.row_off), int(window.col_off), int(window.height), int(window.width)],
        "crs": info.crs,
        "transform": list(transform)[:6],
        "bounds": [left, bottom, right, top],
        "center_lonlat": center_lonlat,
        "pixel_spacing_m": info.pixel_spacing_m,
        "product": info.product,
        "polarisations": info.polarisations,
        "dtype": info.dtype,
        "nodata": info.nodata,
        "acquisition_time": info.acquisition_time,
        "sensor": info.sensor,
        "orbit": info.orbit,
        "calibration_gain": _float_or_none(info.extra_tags.get("CALIBRATION_GAIN")),
        "valid_fraction": round(valid_fraction, 6),
    }


def find_rasters(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named on the command line, or every GeoTIFF under named folders; sorted for determinism."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TIFF_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise SarReadError(f"{p}: input does not exist")
    return sorted(set(found))
