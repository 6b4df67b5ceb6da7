"""MLflow for real: the default local sqlite store, and a real `mlflow server` on loopback that the tests kill
and restart mid-run. Runs are tiny 2-rank DeepSpeed jobs launched by `knowlip train`; what they logged is read
back with MlflowClient and compared with the run's own metrics.jsonl."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_no_secret_in, free_port, losses
from knowlip.track.mlflow_tracker import RUN_FILE, flatten, numeric

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "knowlip.cli"]


def test_flatten_and_numeric_rows():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert numeric({"step": 3, "loss": 1.5, "ok": True, "mem_kind": "host_rss", "n": 2}) == {"loss": 1.5, "n": 2.0}


# Secrets a user gives on the command line or through the environment: none may reach a file, a log or MLflow.
SECRETS = {"key": "AKIAKNOWLIPTESTKEY1", "rotated": "AKIAKNOWLIPTESTKEY9", "secret": "knowlip-secret-value-2",
           "env": "knowlip-env-token-3", "password": "knowlip-uri-password-4"}
SECRET_ENV = {"KNOWLIP_TEST_TOKEN": SECRETS["env"]}


def secret_overrides(key: str = SECRETS["key"]) -> list[str]:
    return [f"storage.options.key={key}", f"storage.options.secret={SECRETS['secret']}",
            "storage.options.session_token=${oc.env:KNOWLIP_TEST_TOKEN}"]


def train(run: Path, base: list[str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = CLI + ["train", f"run_dir={run}", "dist.nproc_per_node=2", *base, "mlflow.enabled=true",
                 "mlflow.system_interval_s=1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def client_for(run: Path):
    from mlflow.tracking import MlflowClient

    info = json.loads((run / RUN_FILE).read_text())
    return MlflowClient(tracking_uri=info["tracking_uri"]), info["run_id"]


def steps_of(client, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_default_store_one_run_across_stop_and_resume(tiny_train_base, synth_shards, tmp_path):
    """Also: secrets given by dotlist and by environment (a key rotated at the resume) reach nothing that is
    printed or written (README "Security"), through train, resume, config show, export and eval."""
    run = tmp_path / "runs" / "tiny"
    first = train(run, tiny_train_base, "train.stop_at=4", *secret_overrides(), env=SECRET_ENV)
    client, run_id = client_for(run)
    assert json.loads((run / RUN_FILE).read_text())["tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    stopped = client.get_run(run_id)  # a planned stop: finished as planned, and the tag says it is resumable
    assert stopped.info.status == "FINISHED" and "planned stop (train.stop_at) at step 4" in stopped.data.tags["knowlip.stop"]
    second = train(run, tiny_train_base, "train.lr=0.0002",  # resumes, with a changed config
                   "mlflow.register_as=sar-knowlip", *secret_overrides(SECRETS["rotated"]), env=SECRET_ENV)
    assert f"MLflow run {run_id}" in second.stdout and f"knowlip mlflow ui {run}" in second.stdout
    assert client_for(run)[1] == run_id  # the same run, reopened
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert len(client.search_runs([r.info.experiment_id])) == 1
    assert steps_of(client, run_id) == list(range(1, 9))  # continuous across the resume
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(losses(run), rel=1e-6)  # what metrics.jsonl says
    assert r.data.params["data.batch_size"] == "4" and r.data.params["train.steps"] == "8"
    assert r.data.params["train.lr"] == "0.0003"  # params keep the first value ...
    assert r.data.tags["knowlip.resumes"] == "1"  # ... the resume and the change are tags
    assert "train.lr" in r.data.tags["knowlip.resume.1.config_changes"]
    assert "storage" not in r.data.tags["knowlip.resume.1.config_changes"]  # a rotated key is no config change
    assert r.data.params["storage.options.key"] == "***"
    assert r.data.tags["knowlip.world_size"] == "2" and r.data.tags["knowlip.git_commit"] != ""
    assert_registered(client, "sar-knowlip", run, run_id, 8, synth_shards)  # mlflow.register_as, at the end
    assert steps_of(client, run_id, "event_checkpoint") == [4, 8]
    system = [k for k in r.data.metrics if k.startswith("system/")]
    assert any(k.endswith("cpu_utilization_percentage") and socket.gethostname() in k for k in system), system
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id,
                                                                                                          "report")}
    assert {"config.yaml", "deepspeed_config.json", "report/losses.png", "report/summary.md"} <= artifacts
    env = {**os.environ, **SECRET_ENV}
    shown, exported, evaluated = (subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, env=env)
                                  for args in (["config", "show", *tiny_train_base, *secret_overrides()],
                                               ["export", str(run), "--out", str(tmp_path / "export")],
                                               ["eval", str(run), "--shards", str(synth_shards)]))
    assert shown.returncode == exported.returncode == evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "key: '***'" in shown.stdout and "session_token: '***'" in shown.stdout  # resolved, then masked
    assert "${oc.env:KNOWLIP_TEST_TOKEN}" in (run / "config.yaml").read_text()  # saved as written, resolved on load
    assert_no_secret_in(tmp_path, SECRETS.values(), *(p.stdout + p.stderr for p in (first, second, shown, exported, evaluated)))


def assert_registered(client, name: str, run: Path, run_id: str, step: int, shards) -> None:
    """Version 1 of `name` is a model of the training run, tagged with its lineage, and mlflow.pyfunc loads it
    (through the store: the server's artifact proxy, or the sqlite store's folder) to embeddings equal to
    knowlip's own model's."""
    import mlflow
    import numpy as np
    import torch

    from knowlip.data.loader import StreamingLoader
    from knowlip.ops.sar_norm import normalise_batch
    from knowlip.train.export import load_model

    version = client.get_model_version(name, "1")
    assert version.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    tags = version.tags
    assert tags["knowlip.run_id"] == run_id and tags["knowlip.step"] == str(step)
    assert tags["knowlip.git_commit"] == client.get_run(run_id).data.tags["knowlip.git_commit"] != "-"
    assert tags["knowlip.config_hash"] and tags["knowlip.dataset_fingerprint"] and tags["knowlip.dataset_samples"]
    model, tokenizer, cfg = load_model(run)
    batch = next(iter(StreamingLoader(shards, batch_size=4)))
    chips = normalise_batch(batch, cfg.norm, torch.device("cpu"), torch.float32)
    text = tokenizer(batch["captions"], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    from knowlip.track.mlflow_tracker import using_store

    env = os.environ.get("MLFLOW_TRACKING_URI")
    with using_store(client._tracking_client.tracking_uri):  # not set for the tests that follow
        out = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(
            {"pixel_values": chips.numpy(), "input_ids": text.input_ids.numpy(),
             "attention_mask": text.attention_mask.numpy()})
    assert os.environ.get("MLFLOW_TRACKING_URI") == env  # child processes of later tests see no leftover
    with torch.no_grad():
        image, text_feat = model.encode_image(chips)[1], model.encode_text(text.input_ids, text.attention_mask)
    np.testing.assert_allclose(out["image_embeds"], image.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["text_embeds"], text_feat.numpy(), atol=1e-5)


class MlflowServer:
    """A real `mlflow server` (sqlite backend, local artifacts) that can be killed and started again."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"), start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, (self.root / "server.log").read_text()[-2000:]
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole session: uvicorn and its workers
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def test_server_killed_mid_run_training_finishes_and_sync_completes_the_history(server, tiny_train_base,
                                                                                 tmp_path):
    run = tmp_path / "run"
    steps = 24
    uri = server.uri.replace("://", f"://knowlip:{SECRETS['password']}@")  # a password in the URI stays unwritten
    cmd = CLI + ["train", f"run_dir={run}", "dist.nproc_per_node=2", *tiny_train_base, f"train.steps={steps}",
                 "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "mlflow.retry_s=0.5",
                 "mlflow.system_metrics=false"]
    # test hook: slow steps 4-20 down so that the outage falls inside the run
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "KNOWLIP_FAULT_SLOW_STEPS": "4-20"})
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 5:
        assert time.monotonic() < deadline and job.poll() is None, "training did not start"
        time.sleep(0.1)
    server.kill()  # after step 5
    while len(metrics.read_text().splitlines()) < 10:  # steps logged while the server is down
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.1)
    server.start()
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert "MLflow unreachable" in err  # warned, and carried on
    client, run_id = client_for(run)
    assert client.get_run(run_id).info.status == "FINISHED"
    logged = steps_of(client, run_id)
    assert set(range(6, 10)) <= set(logged) <= set(range(1, steps + 1))  # the outage's rows were buffered, sent
    sync = subprocess.run(CLI + ["mlflow", "sync", str(run)], capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert f"uploaded {steps - len(set(logged))} metric rows" in sync.stdout
    assert steps_of(client, run_id) == list(range(1, steps + 1))  # nothing lost
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(losses(run), rel=1e-6)
    registered = subprocess.run(CLI + ["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf",
                                       "--register", "sar-knowlip", "--tracking-uri", server.uri],
                                capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stdout[-2000:] + registered.stderr[-2000:]
    assert f"registered models:/sar-knowlip/1 from run {run_id} (step {steps})" in registered.stdout
    assert_registered(client, "sar-knowlip", run, run_id, steps, tiny_train_base[0].split("=", 1)[1])
    assert_no_secret_in(tmp_path, SECRETS.values(), out, err, sync.stdout, sync.stderr, registered.stdout,
                        registered.stderr)


def test_run_page_in_headless_chromium_shows_the_loss_chart(server, tiny_train_base, tmp_path):
    """The MLflow UI itself (the real server's React app) rendered by Debian's Chromium: the run's Model metrics
    page must draw the loss chart. The PNG is kept in runs/test-artifacts/ for a person to look at."""
    import shutil

    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the UI test: chromium is not installed (make test installs it as root)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    run = tmp_path / "run"
    train(run, tiny_train_base, f"mlflow.tracking_uri={server.uri}", "mlflow.system_metrics=false")
    client, run_id = client_for(run)
    experiment = client.get_run(run_id).info.experiment_id
    shot = tmp_path / "run_page.png"
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    # tall enough for every chart (about 30, three a row): the loss chart is on the page
                    "--window-size=1400,3600", "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw", f"--screenshot={shot}",
                    f"{server.uri}/#/experiments/{experiment}/runs/{run_id}/model-metrics"],
                   capture_output=True, timeout=120, check=True)
    kept = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts" / "mlflow_run_page.png"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 5, f"blank page: {kept}"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    chart_line = ((r < 80) & (g < 150) & (b > 150)).sum()  # the series' blue (about 1,000 px per chart)
    assert chart_line > 10_000, f"the metric charts were not drawn ({chart_line} chart-blue pixels): {kept}"
