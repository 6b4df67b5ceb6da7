import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from helpers import make_config
from knowlip.data.pack import pack
from knowlip.sar.geotiff import SarReadError, iter_chips, open_scene


def _write(path, data, crs="EPSG:32631", nodata=None, descriptions=(), tags=None, transform=None):
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, nodata=nodata)
    if crs:
        profile.update(crs=crs, transform=transform or from_origin(620000, 4830000, 10, 10))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions, 1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)


def test_real_sentinel1_scene_metadata(sentinel1_dir):
    for tif in sorted(sentinel1_dir.glob("*.tif")):
        info = open_scene(tif)
        assert info.crs == "EPSG:32631"
        assert info.product == "db" and info.polarisations == ["VV"]
        assert info.nodata == -99
        assert info.pixel_spacing_m == [20.0, 20.0]
        lon, lat = info.center_lonlat
        assert abs(lon - 4.52) < 0.02 and abs(lat - 43.59) < 0.02
        assert info.sensor == "S1A" and info.acquisition_time.startswith(("2015-03-09", "2017-03-09"))


def test_real_sentinel1_scenes_pack_with_georeference_in_every_chip(sentinel1_dir, tmp_path):
    cfg = make_config(tmp_path, f"pack.inputs=[{sentinel1_dir}]", "pack.missing_caption=geo_only",
                      "pack.chip.size=64", "pack.chip.stride=32")
    index_path, report = pack(cfg)
    assert report.scenes_packed == 2 and report.samples > 20 and not report.skipped_files
    index = json.loads(Path(index_path).read_text())
    n = 0
    for name in index["shard_columns"]["name"]:
        with tarfile.open(tmp_path / "shards" / name) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    n += 1
                    assert meta["crs"] == "EPSG:32631"
                    lon, lat = meta["center_lonlat"]
                    assert 4.48 < lon < 4.56 and 43.56 < lat < 43.62
                    # the chip's own transform: origin moves with the window, spacing stays 20 m
                    row, col = meta["window"][:2]
                    assert meta["transform"][2] == pytest.approx(620048.241204 + 20 * col)
                    assert meta["transform"][5] == pytest.approx(4830114.70107 - 20 * row)
                    assert meta["product"] == "db"
                if m.name.endswith(".txt"):
                    assert tar.extractfile(m).read().decode().startswith("Located at 43.")
    assert n == report.samples


def test_nodata_becomes_nan_and_lowers_valid_fraction(tmp_path):
    data = np.full((1, 64, 64), -10.0, np.float32)
    data[0, :16, :] = -99.0
    data[0, 20, 20] = np.inf
    path = tmp_path / "x_db.tif"
    _write(path, data, nodata=-99.0)
    (chip,) = iter_chips(path, 64, 64, 0.1)
    assert np.isnan(chip.data[0, :16]).all() and np.isnan(chip.data[0, 20, 20])
    assert int(np.isnan(chip.data).sum()) == 16 * 64 + 1
    assert chip.valid_fraction == pytest.approx((64 * 48 - 1) / 4096)
    assert list(iter_chips(path, 64, 64, 0.9)) == []


@pytest.mark.parametrize("dtype,product", [("complex64", "complex"), ("uint16", "dn"), ("float32", "intensity")])
def test_product_kind_from_dtype_and_band_names(tmp_path, dtype, product):
    data = (np.arange(2 * 32 * 32).reshape(2, 32, 32) % 100 + 1).astype(dtype)
    path = tmp_path / "scene.tif"
    _write(path, data, descriptions=("VV", "VH"))
    info = open_scene(path)
    assert info.product == product and info.polarisations == ["VV", "VH"]
    (chip,) = iter_chips(path, 32, 32, 0.5)
    assert chip.data.dtype == np.dtype(dtype) and chip.data.shape == (2, 32, 32)
    np.testing.assert_array_equal(chip.data, data)


def test_band_names_from_config_and_mismatch(tmp_path):
    path = tmp_path / "plain.tif"
    _write(path, np.ones((2, 8, 8), np.float32))
    assert open_scene(path, band_names=["hh", "hv"]).polarisations == ["HH", "HV"]
    with pytest.raises(SarReadError, match="plain.tif: 2 bands but 1 band names"):
        open_scene(path, band_names=["VV"])


def test_not_a_raster_and_no_crs_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff" * 100)
    with pytest.raises(SarReadError, match=r"junk.tif: not a readable raster"):
        open_scene(junk)
    nocrs = tmp_path / "nocrs.tif"
    _write(nocrs, np.ones((1, 8, 8), np.float32), crs=None)
    with pytest.raises(SarReadError, match=r"nocrs.tif: has no CRS"):
        open_scene(nocrs)


def test_pack_skips_and_lists_bad_files_and_packs_the_rest(tmp_path, sentinel1_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for tif in sentinel1_dir.glob("*.tif"):
        (inputs / tif.name).write_bytes(tif.read_bytes())
    (inputs / "corrupt.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    _write(inputs / "nocrs.tif", np.ones((1, 64, 64), np.float32), crs=None)
    # a UTM georeference far outside the projection's domain: GDAL cannot transform its centre to lon/lat
    _write(inputs / "offworld.tif", np.ones((1, 64, 64), np.float32), transform=from_origin(1e12, 1e12, 10, 10))
    # an absurd size (sparse: a few MB on disk) that reading strips of would exhaust memory
    with rasterio.open(inputs / "huge.tif", "w", driver="GTiff", width=100_000, height=100_000, count=1,
                       dtype="float32", crs="EPSG:32633", transform=from_origin(500_000, 5_000_000, 10, 10),
                       tiled=True, compress="deflate", sparse_ok=True):
        pass
    cfg = make_config(tmp_path, f"pack.inputs=[{inputs}]", "pack.missing_caption=geo_only")
    _, report = pack(cfg)
    skipped = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in report.skipped_files}
    assert set(skipped) == {"corrupt.tif", "nocrs.tif", "offworld.tif", "huge.tif"}
    assert "no CRS" in skipped["nocrs.tif"]
    assert "outside of projection domain" in skipped["offworld.tif"]
    assert "10,000,000,000 values, over pack.max_scene_values" in skipped["huge.tif"]
    assert report.scenes_packed == 2 and report.samples > 0


def test_missing_captions_are_skipped_and_counted_by_default(tmp_path, sentinel1_dir):
    cfg = make_config(tmp_path, f"pack.inputs=[{sentinel1_dir}]")
    _, report = pack(cfg)
    assert report.samples == 0 and report.chips_without_caption > 0


def test_chip_georeference_equals_the_scene_affine_on_synthetic_scenes(tmp_path):
    """Tight tolerances on synthetic UTM scenes (no real data needed): each chip's transform is the scene's
    transform shifted to the window's corner, its bounds span exactly size pixels, and its centre lon/lat is the
    scene transform applied to the window's centre pixel, projected to WGS84. Computed here from the scene's own
    affine (plain arithmetic), not from the code under test; a one-pixel shift (10 m, ~1e-4 degrees) fails."""
    from rasterio.warp import transform as warp

    from knowlip.sar.synth import synthesise_from_config

    cfg = make_config(tmp_path, "synth.num_scenes=2", "synth.size=128")
    for scene in synthesise_from_config(cfg):
        with rasterio.open(scene) as src:
            a, b, c, d, e, f = list(src.transform)[:6]
            crs = src.crs
        chips = list(iter_chips(scene, 32, 32, 0.0))
        assert len(chips) == 16
        for chip in chips:
            row, col, h, w = chip.meta["window"]
            assert (h, w) == (32, 32)
            expected = [a, b, c + a * col + b * row, d, e, f + d * col + e * row]
            np.testing.assert_allclose(chip.meta["transform"], expected, rtol=0, atol=1e-6)
            corners_x = [c + a * col, c + a * (col + w)]
            corners_y = [f + e * row, f + e * (row + h)]
            np.testing.assert_allclose(chip.meta["bounds"], [min(corners_x), min(corners_y), max(corners_x),
                                                             max(corners_y)], rtol=0, atol=1e-6)
            cx, cy = c + a * (col + w / 2) + b * (row + h / 2), f + d * (col + w / 2) + e * (row + h / 2)
            lon, lat = warp(crs, "EPSG:4326", [cx], [cy])
            np.testing.assert_allclose(chip.meta["center_lonlat"], [lon[0], lat[0]], rtol=0, atol=1e-7)
