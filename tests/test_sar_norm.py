"""The CPU reference of the SAR normalisation against float64 numpy, on real scenes and edge cases."""

import numpy as np
import pytest
import rasterio
import torch

from knowlip.config import load_config
from knowlip.ops.sar_norm import NormParams, kernel_available, params_from_config, reference, sar_normalize

VV, VH = (-25.0, 0.0), (-32.5, 0.0)


def oracle(intensity_or_db: np.ndarray, db_input: bool, clip, fill=0.0, mode="scale", mean=None, std=None,
           nodata=None):
    """float64 numpy: the semantics written out once more, independently. Channel axis 1."""
    x = intensity_or_db.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        valid = np.isfinite(x) if db_input else np.isfinite(x) & (x > 0)
        if nodata is not None:
            valid &= x != nodata
        db = x if db_input else 10.0 * np.log10(x)
    lo = np.array([c[0] for c in clip]).reshape(1, -1, 1, 1)
    hi = np.array([c[1] for c in clip]).reshape(1, -1, 1, 1)
    clipped = np.clip(db, lo, hi)
    if mode == "scale":
        out = (clipped - lo) / (hi - lo)
    else:
        out = (clipped - np.reshape(mean, (1, -1, 1, 1))) / np.reshape(std, (1, -1, 1, 1))
    return np.where(valid, out, fill), valid


def real_scenes_db(sentinel1_dir) -> np.ndarray:
    arrays = []
    for tif in sorted(sentinel1_dir.glob("*.tif")):
        with rasterio.open(tif) as src:
            arrays.append(src.read(1)[:216, :264])
    return np.stack(arrays)[:, None]  # (2, 1, 216, 264), dB with nodata -99


def test_reference_matches_float64_on_real_sentinel1_scenes(sentinel1_dir):
    db = real_scenes_db(sentinel1_dir)
    db[:, :, :3, :10] = -99.0  # a nodata patch, as at a swath edge
    intensity = np.where(db == -99.0, 0.0, 10.0 ** (db.astype(np.float64) / 10.0)).astype(np.float32)
    p = NormParams(products=("intensity",), clip_db=(VV,))
    out, valid = reference(torch.from_numpy(intensity), p)
    expected, expected_valid = oracle(intensity, False, [VV])
    np.testing.assert_array_equal(valid.numpy(), expected_valid)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=2e-6)
    assert not valid.numpy()[db == -99.0].any() and valid.numpy().mean() > 0.99
    # and back where we started: the stored dB values, clipped and scaled
    from_db, _ = oracle(db, True, [VV], nodata=-99.0)
    np.testing.assert_allclose(out.numpy(), from_db, atol=1e-5)
    # the same scenes fed as dB give the same result
    out_db, valid_db = reference(torch.from_numpy(db), NormParams(("db",), (VV,), nodata=-99.0))
    np.testing.assert_array_equal(valid_db.numpy(), valid.numpy())
    np.testing.assert_allclose(out_db.numpy(), out.numpy(), atol=1e-5)


def test_edge_cases_never_give_nan():
    x = torch.tensor([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1.0, 1e30, -99.0, 0.01])
    x = x.view(1, 1, 1, -1)
    out, valid = reference(x, NormParams(("intensity",), (VV,), nodata=-99.0, fill=-1.0))
    assert torch.isfinite(out).all()
    assert valid.view(-1).tolist() == [False, False, False, False, False, True, True, True, False, True]
    assert out.view(-1)[:5].tolist() == [-1.0] * 5
    assert out.view(-1)[5:8].tolist() == [0.0, 1.0, 1.0]  # clipped at both ends
    assert out.view(-1)[9].item() == pytest.approx((-20 + 25) / 25)


def test_complex_layouts_agree_with_intensity():
    rng = np.random.default_rng(0)
    re = rng.normal(0, 0.3, (2, 2, 8, 8)).astype(np.float32)
    im = rng.normal(0, 0.3, (2, 2, 8, 8)).astype(np.float32)
    re[0, 0, 0, :3] = 0
    im[0, 0, 0, :3] = 0  # zero intensity: invalid
    clip = (VV, VH)
    intensity = re.astype(np.float64) ** 2 + im.astype(np.float64) ** 2
    expected, expected_valid = oracle(intensity, False, clip)
    p = NormParams(("complex", "complex"), clip)
    z = torch.complex(torch.from_numpy(re), torch.from_numpy(im))
    for x in (z, torch.view_as_real(z).contiguous()):
        out, valid = reference(x, p)
        np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
        np.testing.assert_array_equal(valid.numpy(), expected_valid)
    pairs = torch.from_numpy(rng.integers(-300, 300, (1, 2, 4, 4, 2)).astype(np.int16))
    pairs[0, 1, 0, 0] = 0
    i64 = pairs.double().pow(2).sum(-1).numpy()
    expected, expected_valid = oracle(i64, False, clip)
    out, valid = reference(pairs, p)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
    assert not valid[0, 1, 0, 0]


def test_uint16_with_calibration_gain_and_amplitude():
    dn = np.array([0, 1, 10, 100, 1000, 65535], np.uint16).reshape(1, 1, 1, -1)
    gain = 1e-6
    expected, expected_valid = oracle(gain * dn.astype(np.float64) ** 2, False, [VV])
    out, valid = reference(torch.from_numpy(dn), NormParams(("dn",), (VV,), gain=(gain,)))
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
    np.testing.assert_array_equal(valid.numpy(), expected_valid)
    amp = np.array([0.0, -0.5, 0.05, 0.3, 1.0], np.float32).reshape(1, 1, 1, -1)
    expected, expected_valid = oracle(np.where(amp > 0, amp.astype(np.float64) ** 2, 0), False, [VV])
    out, valid = reference(torch.from_numpy(amp), NormParams(("amplitude",), (VV,)))
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
    np.testing.assert_array_equal(valid.numpy(), expected_valid)


def test_per_channel_kinds_standardise_and_bf16():
    rng = np.random.default_rng(1)
    vv = rng.gamma(4, 0.05, (3, 1, 6, 6)).astype(np.float32)
    vh_db = rng.normal(-20, 5, (3, 1, 6, 6)).astype(np.float32)
    x = torch.from_numpy(np.concatenate([vv, vh_db], axis=1))
    p = NormParams(("intensity", "db"), (VV, VH), mode="standardise", mean_db=(-12.0, -19.0), std_db=(4.0, 5.0))
    out, _ = reference(x, p)
    e_vv, _ = oracle(vv, False, [VV], mode="standardise", mean=[-12.0], std=[4.0])
    e_vh, _ = oracle(vh_db, True, [VH], mode="standardise", mean=[-19.0], std=[5.0])
    np.testing.assert_allclose(out.numpy(), np.concatenate([e_vv, e_vh], axis=1), atol=3e-6)
    half, _ = reference(x, NormParams(p.products, p.clip_db, "standardise", p.mean_db, p.std_db,
                                      out_dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, out.to(torch.bfloat16))  # exactly float32 rounded to bf16


def test_params_validation_and_from_config():
    with pytest.raises(ValueError, match="clip range"):
        NormParams(("intensity",), ((0.0, -1.0),))
    with pytest.raises(ValueError, match="unknown product kind 'sigma'"):
        NormParams(("sigma",), (VV,))
    with pytest.raises(ValueError, match="does not match the input layout"):
        reference(torch.ones(1, 1, 2, 2), NormParams(("dn",), (VV,)))
    with pytest.raises(ValueError, match="unsupported raw chip layout"):
        reference(torch.ones(1, 1, 2, 2, dtype=torch.float64), NormParams(("intensity",), (VV,)))
    cfg = load_config(None, ["norm.out_dtype=bfloat16"])
    p = params_from_config(cfg.norm, ["VV", "VH", "XX"], "intensity")
    assert p.clip_db == (VV, VH, (-25.0, 0.0)) and p.out_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="norm.mean_db.VV"):
        params_from_config(load_config(None, ["norm.mode=standardise"]).norm, ["VV"], "intensity")


def test_dispatch_uses_reference_off_gpu():
    x = torch.rand(2, 1, 8, 8)
    p = NormParams(("intensity",), (VV,))
    a, b = sar_normalize(x, p), reference(x, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if not torch.cuda.is_available():
        assert not kernel_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_matches_reference_on_gpu():
    x = torch.rand(4, 2, 64, 64, device="cuda") * 2 - 0.2  # some non-positive values
    p = NormParams(("intensity", "amplitude"), (VV, VH))
    out, valid = sar_normalize(x, p)
    ref, ref_valid = reference(x.cpu(), p)
    assert torch.equal(valid.cpu(), ref_valid)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("odd", [False, True])
def test_invalid_pixel_matrix_on_the_reference(odd):
    """Every input kind x NaN / inf / nodata / zero / negative: the mask the rules of sar_cases give, the fill
    value exactly where invalid, finite everywhere."""
    from knowlip.ops.sar_cases import invalid_pixel_matrix

    cases = invalid_pixel_matrix(odd=odd)
    kinds = {c.name.split("/")[0] for c in cases}
    assert kinds == {"float32_intensity", "float32_amplitude", "float32_db", "complex64", "float32_pairs",
                     "int16_pairs", "uint16_dn"}
    for case in cases:
        out, valid = reference(case.x, case.params)
        assert torch.equal(valid, case.expected_valid), case.name
        assert torch.isfinite(out).all(), case.name
        assert (out[~valid] == case.params.fill).all() and (out[valid] != case.params.fill).all(), case.name


def test_a_folder_mixing_intensity_and_db_chips_is_normalised_per_chip(tmp_path):
    """Intensity and dB chips are both float32, so the loader lets them share a batch; each chip must be
    normalised as its own product kind (the trainer once took the first batch's kind for the whole run)."""
    from helpers import make_config
    from knowlip.data.loader import StreamingLoader
    from knowlip.data.pack import pack
    from knowlip.ops.sar_norm import normalise_batch
    from knowlip.sar.synth import synthesise_from_config

    cfg = make_config(tmp_path, "synth.num_scenes=2", "synth.size=64", "synth.products=[intensity,db]",
                      "pack.chip.size=32", "pack.chip.stride=32")
    synthesise_from_config(cfg)
    pack(cfg)
    batch = next(iter(StreamingLoader(tmp_path / "shards", batch_size=8, drop_last=False)))
    products = [m["product"] for m in batch["meta"]]
    assert sorted(set(products)) == ["db", "intensity"], products
    images = normalise_batch(batch, cfg.norm, torch.device("cpu"), torch.float32)
    for i, product in enumerate(products):  # float64 numpy, each chip as what it is
        expected, _ = oracle(batch["chips"][i : i + 1].numpy(), product == "db", [VV])
        np.testing.assert_allclose(images[i : i + 1].numpy(), expected, atol=1e-5)
