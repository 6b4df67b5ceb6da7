import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import webdataset as wds

from helpers import make_config
from knowlip.data.pack import pack
from knowlip.data.shards import load_index
from knowlip.sar.synth import synthesise_from_config
from knowlip.text.caption import parse_caption


def _digest(folder, pattern="shard-*.tar"):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def test_synth_is_deterministic_and_georeferenced(tmp_path):
    a = make_config(tmp_path / "a", "synth.num_scenes=3", "synth.size=64")
    b = make_config(tmp_path / "b", "synth.num_scenes=3", "synth.size=64")
    pa, pb = synthesise_from_config(a), synthesise_from_config(b)
    for x, y in zip(pa, pb):
        with rasterio.open(x) as sx, rasterio.open(y) as sy:
            np.testing.assert_array_equal(sx.read(), sy.read())
            assert sx.crs == sy.crs and sx.crs.to_epsg() is not None
    assert (tmp_path / "a/scenes/captions.jsonl").read_text() == (tmp_path / "b/scenes/captions.jsonl").read_text()


def test_round_trip_through_a_stock_webdataset_reader(tmp_path):
    cfg = make_config(tmp_path, "synth.num_scenes=4", "synth.size=96", "synth.products=[intensity,dn,complex,db]",
                      "synth.polarisations=[VV,VH]", "pack.chip.size=32", "pack.chip.stride=32",
                      "pack.shard_max_samples=10")
    paths = synthesise_from_config(cfg)
    index_path, report = pack(cfg)
    index = load_index(tmp_path / "shards")
    assert report.samples == index.total_samples > 0 and len(index.shards) > 1
    captions = {json.loads(l)["id"]: json.loads(l)["caption"] for l in open(tmp_path / "scenes/captions.jsonl")}
    urls = [str(index.path(s)) for s in index.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen += 1
        meta = json.loads(sample["json"])
        chip = np.load(__import__("io").BytesIO(sample["chip.npy"]))
        scene = next(p for p in paths if p.stem == meta["scene_id"])
        row, col, h, w = meta["window"]
        with rasterio.open(scene) as src:
            expected = src.read(window=((row, row + h), (col, col + w)))
        valid = ~np.isnan(chip) if np.issubdtype(chip.dtype, np.floating) else chip != 0
        np.testing.assert_array_equal(chip[valid], expected[valid])
        assert chip.dtype == expected.dtype and meta["polarisations"] == ["VV", "VH"]
        text = sample["txt"].decode()
        cap = parse_caption(text)
        assert parse_caption(captions[sample["__key__"]]).without("geo").clauses == cap.without("geo").clauses
        for f, start, end in meta["keyword_spans"]:
            assert text[start:end] == cap.clauses[f]
    assert seen == index.total_samples
    assert {"intensity", "dn", "complex", "db"} == {json.loads(s["json"])["product"] for s in
                                                   wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_pack_output_is_deterministic_and_tar_lists_it(tmp_path):
    cfg = make_config(tmp_path, "synth.num_scenes=2", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
                      "pack.shard_max_samples=3")
    synthesise_from_config(cfg)
    pack(cfg)
    first = _digest(tmp_path / "shards")
    pack(make_config(tmp_path, "synth.num_scenes=2", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
                     "pack.shard_max_samples=3", "pack.overwrite=true"))
    assert _digest(tmp_path / "shards") == first and len(first) >= 2
    listing = subprocess.run(["tar", "tf", str(tmp_path / "shards/shard-000000.tar")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(listing) == 9 and listing[0].endswith(".chip.npy") and listing[2].endswith(".json")
    index = json.loads((tmp_path / "shards/index.json").read_text())
    assert index["total_samples"] == sum(index["shard_columns"]["samples"]) and index["version"] == 2


def test_captions_are_predictable_from_pixels(synth_shards):
    """Chips captioned with water are darker; chips captioned with dense buildings are brighter."""
    index = load_index(synth_shards)
    by_water, by_buildings = {True: [], False: []}, {True: [], False: []}
    for shard in index.shards:
        for s in wds.WebDataset([str(index.path(shard))], shardshuffle=False, empty_check=False):
            chip = np.load(__import__("io").BytesIO(s["chip.npy"]))
            db = np.nanmedian(10 * np.log10(chip))
            clauses = parse_caption(s["txt"].decode()).clauses
            by_water[clauses["water"] != "no water"].append(db)
            by_buildings[clauses["buildings"].startswith("dense")].append(np.nanpercentile(10 * np.log10(chip), 99))
    assert by_water[True] and by_water[False]
    assert np.mean(by_water[True]) < np.mean(by_water[False]) - 1.0
    if by_buildings[True]:
        assert np.mean(by_buildings[True]) > np.mean(by_buildings[False]) + 3.0


def test_cli_synth_pack_inspect(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "knowlip.cli", *a], capture_output=True, text=True,
                                    cwd=tmp_path)
    assert run("synth", "synth.num_scenes=2", "synth.size=64").returncode == 0
    out = run("pack", "pack.chip.size=32", "pack.chip.stride=32")
    assert out.returncode == 0, out.stderr
    assert "packed 8 samples from 2 scenes" in out.stdout
    positional = run("pack", "runs/quickstart/scenes", "--out", "positional", "pack.chip.size=32",
                     "pack.chip.stride=32")  # inputs as positional arguments, as a new user types them
    assert positional.returncode == 0 and "packed 8 samples from 2 scenes" in positional.stdout, positional.stderr
    again = run("pack", "pack.chip.size=32", "pack.chip.stride=32")
    assert again.returncode == 1 and "runs/quickstart/shards: already holds a packed dataset" in again.stderr
    assert "Traceback" not in again.stderr
    again = run("pack", "--overwrite", "pack.chip.size=32", "pack.chip.stride=32")
    assert again.returncode == 0 and "packed 8 samples from 2 scenes" in again.stdout, again.stderr
    missing_input = run("pack", "no_such_dir", "--out", "x")
    assert missing_input.returncode == 2 and "'no_such_dir' is not of the form key=value" in missing_input.stderr
    ins = run("data", "inspect", "runs/quickstart/shards", "--json")
    report = json.loads(ins.stdout)
    assert report["samples"] == 8 and report["clause_counts"]["water"] == 8
    missing = run("data", "inspect", "nowhere")
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "no shard index" in missing.stderr
    for sub in (["synth"], ["pack"], ["data", "inspect"], ["config", "show"]):
        assert run(*sub, "--help").returncode == 0


def test_inspect_reports_a_damaged_shard_instead_of_failing(synth_shards, tmp_path):
    import shutil

    from knowlip.data.inspect import inspect_shards

    copy = tmp_path / "shards"
    shutil.copytree(synth_shards, copy)
    index = load_index(copy)
    shard = index.shards[0]
    offset, _ = index.table(0).sample_range(3)
    raw = bytearray(index.path(shard).read_bytes())
    raw[offset + 20 : offset + 28] = b"garbage!"  # breaks the 4th sample's tar header checksum
    index.path(shard).write_bytes(bytes(raw))
    report = inspect_shards(str(copy))
    assert len(report["damaged_shards"]) == 1 and shard.name in report["damaged_shards"][0]
    assert report["samples"] == index.total_samples - shard.samples + 3


def test_repacking_into_fewer_shards_removes_the_stale_ones(tmp_path):
    cfg = make_config(tmp_path, "synth.num_scenes=2", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
                      "pack.shard_max_samples=3")
    synthesise_from_config(cfg)
    pack(cfg)
    assert len(list((tmp_path / "shards").glob("shard-*.tar"))) == 3
    pack(make_config(tmp_path, "synth.num_scenes=2", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
                     "pack.shard_max_samples=100", "pack.overwrite=true"))
    assert [p.name for p in (tmp_path / "shards").glob("shard-*.tar")] == ["shard-000000.tar"]
    assert load_index(tmp_path / "shards").total_samples == 8


def test_pack_in_parallel_writes_the_same_bytes(tmp_path):
    """pack.jobs=3 vs 1 on the same scenes (one of them not a raster): every shard and index.json identical."""
    from knowlip.sar.synth import synthesise_from_config

    cfg = make_config(tmp_path, "synth.num_scenes=5", "synth.size=96", "pack.chip.size=32", "pack.chip.stride=32",
                      "pack.shard_max_samples=7")
    synthesise_from_config(cfg)
    (tmp_path / "scenes" / "broken.tif").write_bytes(b"not a tiff")
    outputs = {}
    for jobs in (1, 3):
        out = tmp_path / f"shards{jobs}"
        _, report = pack(make_config(tmp_path, "pack.chip.size=32", "pack.chip.stride=32", "pack.shard_max_samples=7",
                                     f"pack.out_dir={out}", f"pack.jobs={jobs}"))
        assert report.scenes_packed == 5 and len(report.skipped_files) == 1 and report.samples > 21
        outputs[jobs] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert list(outputs[1]) == list(outputs[3]) and len(outputs[1]) >= 4  # several shards + index.json
    for name in outputs[1]:
        assert outputs[1][name] == outputs[3][name], name


def test_packing_in_parts_and_merging_writes_the_same_bytes(tmp_path):
    """The Slurm array's pieces, run here: 3 contiguous parts (one holding a broken file) merged == a local pack."""
    from knowlip.config import to_yaml
    from knowlip.data.pack import merge_parts, pack_part, split_files
    from knowlip.sar.geotiff import find_rasters
    from knowlip.sar.synth import synthesise_from_config

    base = ["pack.chip.size=32", "pack.chip.stride=32", "pack.shard_max_samples=7"]
    synthesise_from_config(make_config(tmp_path, "synth.num_scenes=5", "synth.size=96"))
    (tmp_path / "scenes" / "broken.tif").write_bytes(b"not a tiff")
    local = make_config(tmp_path, *base, f"pack.out_dir={tmp_path}/local")
    pack(local)
    merged = make_config(tmp_path, *base, f"pack.out_dir={tmp_path}/merged")
    files = find_rasters(merged.pack.inputs)
    shares = split_files(files, 3)
    assert [f for s in shares for f in s] == files and all(shares)
    parts = [pack_part(to_yaml(merged), [str(f) for f in s], str(tmp_path / f"part{i}")) for i, s in enumerate(shares)]
    merge_parts(merged, files, parts)
    ours = {p.name: p.read_bytes() for p in sorted((tmp_path / "merged").iterdir())}
    theirs = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").iterdir())}
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name


def test_pack_refuses_a_full_out_and_replaces_it_only_when_complete(tmp_path, monkeypatch):
    """A non-empty --out needs --overwrite; a packing that fails part-way (here: interrupted after 5 samples)
    leaves the earlier dataset byte for byte and no staging folder; a folder holding other files is never
    replaced."""
    from knowlip.data import pack as pack_module
    from knowlip.data.pack import PackOutputError
    from knowlip.data.shards import ShardWriter

    base = ["synth.num_scenes=2", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
            "pack.shard_max_samples=3"]
    synthesise_from_config(make_config(tmp_path, *base))
    pack(make_config(tmp_path, *base))
    before = _digest(tmp_path / "shards", "*")
    assert "index.json" in before
    with pytest.raises(PackOutputError, match=f"{tmp_path / 'shards'}: already holds a packed dataset.*--overwrite"):
        pack(make_config(tmp_path, *base))
    assert _digest(tmp_path / "shards", "*") == before

    real_write, written = ShardWriter.write, []

    def interrupted(self, key, members):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(key)
        real_write(self, key, members)

    monkeypatch.setattr(pack_module.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(make_config(tmp_path, *base[:-1], "pack.shard_max_samples=2", "pack.overwrite=true"))
    monkeypatch.undo()
    assert _digest(tmp_path / "shards", "*") == before and len(written) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes", "shards"]  # no staging left behind

    _, report = pack(make_config(tmp_path, *base[:-1], "pack.shard_max_samples=2", "pack.overwrite=true"))
    assert report.samples == 8 and len(list((tmp_path / "shards").glob("shard-*.tar"))) == 4

    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(PackOutputError, match="notes.txt"):
        pack(make_config(tmp_path, *base, "pack.overwrite=true"))
    assert (tmp_path / "shards" / "notes.txt").read_text() == "mine"
