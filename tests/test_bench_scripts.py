"""The GPU benchmark script must not rot on CPU-only machines: its CPU smoke mode runs every check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_kernel_bench_runs_its_checks_in_cpu_smoke_mode():
    proc = subprocess.run([sys.executable, str(REPO / "bench/kernels.py"), "--device", "cpu", "--sizes-mb", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert summary["checks"] >= 32 and summary["checks_passed"] == summary["checks"]


@pytest.mark.integration
def test_wheel_ships_the_cuda_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=600)
    import zipfile

    (wheel,) = tmp_path.glob("knowlip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in ("sar_norm.cu", "sar_norm.cuh", "sar_norm_binding.cpp"):
        assert f"knowlip/_kernels/{source}" in names


@pytest.mark.integration
def test_train_step_bench_runs_both_engines_on_cpu():
    proc = subprocess.run([sys.executable, str(REPO / "bench/train_step.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r.get("engine") for r in rows[:2]] == ["plain", "deepspeed"]
    assert rows[1]["zero_gather_share"] > 0 and rows[2]["step_time_ratio"] > 0


@pytest.mark.integration
def test_learning_check_bench_trains_and_evaluates(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench/learning_check.py"), "--steps", "3", "--batch-size", "8",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["itc_columns"], r["scio"]) for r in rows] == [("online", False), ("online", True), ("momentum", False)]
    assert all(0 < r["i2t_chance_r1"] < r["i2t_chance_r5"] < 1 for r in rows)
