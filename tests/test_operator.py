"""What an operator sees and does (issue 23): Ctrl-C, early errors, MLflow run states, the UI, the command line.
Real processes: `knowlip` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, as_foreground, losses, wait_for_steps

CLI = [sys.executable, "-m", "knowlip.cli"]


def test_ctrl_c_saves_exits_130_and_the_same_command_resumes(local_run, tiny_train_base, tmp_path):
    """The first Ctrl-C (SIGINT to the launcher, as a terminal sends it to the foreground process) saves at the
    end of the step on every rank and exits 130 with one line on how to resume, no traceback; the same command
    then finishes with the uninterrupted run's losses."""
    run = tmp_path / "run"
    command = CLI + ["train", f"run_dir={run}", "dist.nproc_per_node=2", *tiny_train_base, "train.steps=16",
                     f"log.json={tmp_path}/log.jsonl"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=as_foreground)
    wait_for_steps(run, 3)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 130, out + err[-3000:]
    assert "saved; run the same command to resume" in out and "Traceback" not in err, out + err[-3000:]
    assert err.count("interrupted: saving a checkpoint") == 1, err[-3000:]
    # the log of a non-terminal run: one format, a plain line per logged step, no progress-bar redraws, each
    # message once (rank 0), the start summary first
    lines = [line for line in err.splitlines() if line.strip()]
    form = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) \[rank \d\] ")
    assert all(form.match(line) for line in lines), [line for line in lines if not form.match(line)][:5]
    assert "\r" not in err and "[rank 1]" not in err
    assert "model tiny: " in lines[1] and "2 rank(s) on CPU, engine deepspeed ZeRO-3" in err and "fingerprint" in err
    step_lines = [line for line in lines if " step " in line and "/16 loss " in line]
    assert len(step_lines) == max(losses(run)) and "samples/s" in step_lines[0] and "ETA" in step_lines[0]
    assert err.count("saved checkpoint") == 1
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in records} == {0} and sum("/16 loss " in r["message"] for r in records) == len(step_lines)
    stopped = max(losses(run))
    assert stopped < 16 and (run / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert losses(run) == losses(local_run)


def test_ctrl_c_during_pack_is_one_line_and_leaves_no_staging(tmp_path):
    subprocess.run(CLI + ["synth", "synth.num_scenes=32", "synth.size=256"], cwd=tmp_path, check=True,
                   capture_output=True)
    job = subprocess.Popen(CLI + ["pack", "pack.chip.size=16", "pack.chip.stride=16"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground)
    staging = tmp_path / "runs" / "quickstart" / ".shards.staging"
    deadline = time.monotonic() + 120
    while not list(staging.glob("shard-*")) and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, out + err
    assert "knowlip pack: interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not staging.exists() and not (tmp_path / "runs" / "quickstart" / "shards").exists()


def _timed(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120, cwd=cwd)
    return proc, time.monotonic() - started


def test_what_the_launcher_can_know_alone_fails_or_ends_within_seconds(local_run, tiny_train_base, tmp_path):
    """Against a finished 16-step run: each answer comes before any rank, DeepSpeed or MLflow starts (3 s is a
    bound on this box, not a benchmark: starting the ranks alone takes longer), printed once, nothing written."""
    before = {p: p.stat().st_mtime_ns for p in local_run.rglob("*") if p.is_file()}
    common = ["train", f"run_dir={local_run}", "dist.nproc_per_node=2", *tiny_train_base]

    done, took = _timed(*common, "train.steps=16")
    assert done.returncode == 0 and "already finished: 16 of 16 steps" in done.stdout, done.stdout + done.stderr
    assert took < 3, took

    below, took = _timed(*common, "train.steps=8")
    assert below.returncode == 2 and took < 3, (took, below.stderr)
    assert below.stderr.count("train.steps=8 is below the step this run reached (16") == 1, below.stderr

    missing = local_run / "checkpoints" / "step_00000099"
    wrong, took = _timed(*common, f"resume={missing}")
    assert wrong.returncode == 1 and took < 3, (took, wrong.stderr)
    assert f"resume={missing}" in wrong.stderr and "complete checkpoints: " in wrong.stderr
    assert str(local_run / "checkpoints" / "step_00000016") in wrong.stderr, wrong.stderr

    shards, took = _timed(*common[:3], *tiny_train_base, f"data.shards={tmp_path}/nowhere")
    assert shards.returncode == 1 and f"{tmp_path}/nowhere" in shards.stderr and took < 3, (took, shards.stderr)
    assert "Traceback" not in below.stderr + wrong.stderr + shards.stderr
    assert {p: p.stat().st_mtime_ns for p in local_run.rglob("*") if p.is_file()} == before


def test_mlflow_status_says_how_each_job_ended(tiny_in_process_base, tmp_path, monkeypatch):
    """Planned stop_at: FINISHED; SIGUSR2 (a requeue follows): SCHEDULED; Ctrl-C: KILLED; the end: FINISHED, and
    a start of the finished run does not reopen it; an error or too many non-finite steps: FAILED. Each with a
    `knowlip.stop` tag saying why."""
    from mlflow.tracking import MlflowClient

    from helpers import make_config
    from knowlip.launch.signals import StopRequest
    from knowlip.train.trainer import Trainer

    run = tmp_path / "runs" / "tiny"
    base = [*tiny_in_process_base, "train.steps=5", "mlflow.enabled=true", "mlflow.system_metrics=false"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")

    def status(trainer) -> tuple[str, str]:
        r = client.get_run(trainer.tracking.run_id)
        return r.info.status, r.data.tags.get("knowlip.stop", "")

    first = Trainer(make_config(run, *base, "train.stop_at=2"))
    first.train()
    assert status(first) == ("FINISHED", "planned stop (train.stop_at) at step 2 of 5; resumable")
    for sig, expected in ((signal.SIGUSR2, ("SCHEDULED", "SIGUSR2 at step 3: saved, to be resumed")),
                          (signal.SIGINT, ("KILLED", "SIGINT at step 4: saved, resumable"))):
        stop = StopRequest(announce=False)
        stop.request(sig)
        stopped = Trainer(make_config(run, *base), stop=stop)
        stopped.train()
        assert status(stopped) == expected
    last = Trainer(make_config(run, *base))
    last.train()
    assert status(last) == ("FINISHED", "finished: 5 of 5 steps") and last.tracking.run_id == first.tracking.run_id
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "resumed_from_step" in r] == [3, 4, 5]  # the first row after each resume
    assert [r["resumed_from_step"] for r in rows if "resumed_from_step" in r] == [2, 3, 4]
    assert {"losses.png", "lr.png", "throughput.png", "summary.md"} <= {p.name for p in (run / "report").iterdir()}
    again = subprocess.run(CLI + ["train", f"run_dir={run}", *base], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished: 5 of 5 steps" in again.stdout, again.stderr[-2000:]
    r = client.get_run(last.tracking.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["knowlip.resumes"] == "3"  # not reopened

    broken = Trainer(make_config(tmp_path / "runs" / "broken", *base))
    monkeypatch.setattr(broken, "train_step", lambda micro: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    try:
        broken.train()
    except RuntimeError:
        pass
    assert status(broken) == ("FAILED", "RuntimeError at step 0: disk on fire")
    monkeypatch.setenv("KNOWLIP_FAULT_NAN_STEPS", "1-9")
    nan = Trainer(make_config(tmp_path / "runs" / "nan", *base, "train.max_nonfinite_in_a_row=2"))
    try:
        nan.train()
    except RuntimeError:
        pass
    assert status(nan) == ("FAILED", "too many non-finite steps in a row at step 2")


def test_sync_after_a_tracking_server_that_was_down_for_the_whole_run(tiny_in_process_base, tmp_path):
    """mlflow.json is written before the first attempt to reach the server, so `knowlip mlflow sync RUN
    --tracking-uri URI` can create the run afterwards and upload every step."""
    from mlflow.tracking import MlflowClient

    from helpers import make_config
    from knowlip.train.trainer import Trainer
    from test_mlflow import MlflowServer

    server = MlflowServer(tmp_path)
    down = f"http://127.0.0.1:{server.port}"
    run = tmp_path / "run"
    Trainer(make_config(run, *tiny_in_process_base, "train.steps=4", "train.log_every=1", "mlflow.enabled=true",
                        f"mlflow.tracking_uri={down}", "mlflow.system_metrics=false")).train()
    assert json.loads((run / "mlflow.json").read_text()) == {"tracking_uri": down, "run_id": None}
    server.start()
    try:
        sync = subprocess.run(CLI + ["mlflow", "sync", str(run), "--tracking-uri", server.uri], capture_output=True,
                              text=True, timeout=120)
        assert sync.returncode == 0 and "uploaded 4 metric rows" in sync.stdout, sync.stdout + sync.stderr
        run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
        client = MlflowClient(tracking_uri=server.uri)
        history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        assert history == pytest.approx(losses(run), rel=1e-6) and sorted(history) == [1, 2, 3, 4]
        r = client.get_run(run_id)
        assert r.info.status == "FINISHED" and r.data.params["train.steps"] == "4"
    finally:
        server.kill()


def test_mlflow_ui_serves_the_runs_store_and_prints_its_page(tiny_in_process_base, tmp_path):
    import urllib.request

    from helpers import make_config
    from knowlip.train.trainer import Trainer

    run = tmp_path / "runs" / "tiny"
    trainer = Trainer(make_config(run, *tiny_in_process_base, "train.steps=2", "mlflow.enabled=true",
                                  "mlflow.system_metrics=false"))
    trainer.train()
    run_id = trainer.tracking.run_id
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # as every other output
    ui = subprocess.Popen(CLI + ["mlflow", "ui", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=as_foreground)
    try:
        line = ui.stdout.readline()
        assert "MLflow UI on sqlite:///" in line and f"/runs/{run_id}" in line, line + ui.stderr.read()[-2000:]
        page = line.split(": ", 1)[1].split()[0]
        base = page.split("#")[0]
        assert "<html" in urllib.request.urlopen(base, timeout=30).read().decode().lower()
        api = f"{base}api/2.0/mlflow/runs/get?run_id={run_id}"
        got = json.loads(urllib.request.urlopen(api, timeout=30).read())
        assert got["run"]["info"]["status"] == "FINISHED"
        assert {m["key"] for m in got["run"]["data"]["metrics"]} >= {"loss", "lr"}
    finally:
        ui.send_signal(signal.SIGINT)  # Ctrl-C: the UI and its server workers end
        ui.wait(timeout=60)
    assert ui.returncode == 0
    assert subprocess.run(["pgrep", "-f", f"mlflow ui --backend-store-uri sqlite:///{tmp_path}"]).returncode == 1


def test_the_command_line_explains_itself():
    from knowlip.cli import EXAMPLES, _subparsers, build_parser

    parser = build_parser()
    leaves = {name: p for name, p in _subparsers(parser) if name not in ("config", "mlflow", "ckpt", "data")}
    assert set(leaves) == set(EXAMPLES)
    for name, p in leaves.items():
        assert f"example:\n  knowlip {name}" in p.format_help(), name
        for action in p._actions:
            assert action.help, f"knowlip {name}: {action.option_strings or action.dest} has no help text"
    version = subprocess.run([str(REPO / ".venv/bin/knowlip"), "--version"], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("KNOWLIP_")})
    assert version.returncode == 0
    import deepspeed
    import torch

    assert f"torch {torch.__version__}" in version.stdout and f"deepspeed {deepspeed.__version__}" in version.stdout
    bad = subprocess.run(CLI + ["eval", "x", "--shards", "y", "--fields", "road"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'road'" in bad.stderr and "roads" in bad.stderr
