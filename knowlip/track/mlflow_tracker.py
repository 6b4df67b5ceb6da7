"""MLflow tracking that never blocks a step and loses nothing.

- Where: `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store beside the run folders
  (`<runs>/mlflow.db`, artifacts in `<runs>/mlartifacts`).
- Who: rank 0 logs the run (params, metrics, events, report); local rank 0 of every node logs that node's system
  metrics (CPU, memory, GPU), named by host.
- How: rank 0's calls only put rows on a bounded queue; a background thread sends them in batches. When the
  server is away it warns once, keeps the newest `queue_size` rows and retries every `retry_s`; rows it had to
  drop are still in metrics.jsonl, and `knowlip mlflow sync RUN_DIR` uploads whatever the run lacks.
- One run per job: its id is in every checkpoint (and in <run_dir>/mlflow.json); a resume reopens it and records
  the resume (and any config change) as tags, since params cannot change.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from knowlip.redact import MASK, redact_text, redacted_stdout

log = logging.getLogger(__name__)
RUN_FILE = "mlflow.json"
BATCH = 500  # metrics per log_batch call (MLflow accepts 1000)


def default_store(run_dir: Path) -> tuple[str, str]:
    """(tracking URI, artifact root) of the local store beside the run folders."""
    runs = Path(run_dir).resolve().parent
    return f"sqlite:///{runs / 'mlflow.db'}", (runs / "mlartifacts").as_uri()


def tracking_uri(cfg) -> tuple[str, str | None]:
    """(tracking URI, artifact root for a new experiment or None for the server's default)."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return (uri, None) if uri else default_store(Path(cfg.run_dir))


@contextlib.contextmanager
def using_store(uri: str):
    """MLflow's fluent API (start_run, log_model, models:/ URIs) on `uri` for the block, and as it was after.
    mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which every later child process would inherit (a
    training job started afterwards would log into this store): both are put back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def is_file_store(uri: str) -> bool:
    """A store that is a file on disk (sqlite, a file:// folder): one writer at a time, not safe from several
    nodes over a network file system."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ui_command(cfg) -> str:
    """How to browse this run's store: the URL of a server, or the command that starts a UI on a local store."""
    uri, _ = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {redact_text(uri)}"
    return f"knowlip mlflow ui {cfg.run_dir}"


def serve_ui(uri: str, artifacts: str | None, run_id: str | None, host: str = "127.0.0.1", port: int | None = None,
             announce=lambda line: print(line, flush=True)) -> int:
    """Start MLflow's UI on a local store and block until it ends (Ctrl-C); `announce` gets the URL of the run's
    page once the UI answers. Returns the UI's exit code."""
    import socket as sockets
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    if port is None:
        with sockets.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    page = f"http://{host}:{port}/"
    if run_id:
        page += f"#/experiments/{MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id}/runs/{run_id}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", "1"] + (["--default-artifact-root", artifacts] if artifacts else [])
    # its output goes to stderr (stdout: the page's line alone); its own session, ended with its server workers
    ui = subprocess.Popen(command, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                          stdout=sys.stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while ui.poll() is None and time.monotonic() < deadline:
            try:
                with sockets.create_connection((host, port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        if ui.poll() is None:
            announce(f"MLflow UI on {redact_text(uri)}: {page}  (Ctrl-C to stop)")
        return ui.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            try:
                ui.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted params."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)}


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "step"}


class _Sender(threading.Thread):
    """Drains a bounded buffer of metric rows into MlflowClient.log_batch; survives a server that goes away."""

    def __init__(self, client, run_id: str, capacity: int, retry_s: float):
        super().__init__(name="knowlip-mlflow", daemon=True)
        self.client, self.run_id, self.retry_s = client, run_id, retry_s
        self.rows: collections.deque = collections.deque(maxlen=capacity)
        self.dropped = 0
        self.sent = 0
        self.failing = False
        self.inflight = 0
        self._wake = threading.Condition()
        self._closing = False

    def put(self, step: int, values: dict[str, float]) -> None:
        with self._wake:
            if len(self.rows) == self.rows.maxlen:
                self.dropped += 1  # the oldest row goes; metrics.jsonl still has it (knowlip mlflow sync)
            self.rows.append((step, int(time.time() * 1000), values))
            self._wake.notify()

    def run(self) -> None:
        while True:
            with self._wake:
                while not self.rows and not self._closing:
                    self._wake.wait()
                if not self.rows and self._closing:
                    return
                batch = list(self.rows)
                self.rows.clear()
                self.inflight = len(batch)
            ok = self._send(batch)
            with self._wake:
                self.inflight = 0
                if not ok:  # back at the front, the oldest dropped if new rows filled the buffer meanwhile
                    keep = batch[max(0, len(batch) - (self.rows.maxlen - len(self.rows))):]
                    self.dropped += len(batch) - len(keep)
                    self.rows.extendleft(reversed(keep))
            if not ok:
                if self._closing:
                    return
                time.sleep(self.retry_s)

    def _send(self, batch: list) -> bool:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for step, ts, values in batch for k, v in values.items()]
        try:
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH], synchronous=True)
        except Exception as exc:  # server down, network, 5xx: keep the rows, try again later
            if not self.failing:
                log.warning("MLflow unreachable (%s): training goes on; metrics are kept (up to %d rows) and sent "
                            "when it is back", redact_text(str(exc).splitlines()[0][:200]), self.rows.maxlen)
            self.failing = True
            return False
        if self.failing:
            log.warning("MLflow reachable again: sent %d buffered rows", len(batch))
        self.failing = False
        self.sent += len(batch)
        return True

    def close(self, timeout: float) -> None:
        """Send what is left, giving up after `timeout` seconds (what is left stays in metrics.jsonl)."""
        deadline = time.monotonic() + timeout
        while (self.rows or self.inflight) and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.05)
        with self._wake:
            self._closing = True
            self._wake.notify()
        self.join(timeout=max(0.0, deadline - time.monotonic()) + 1)


class MlflowTracker:
    """Rank 0's run. Use start() (new or reopened run), log_metrics(), event(), finish()."""

    def __init__(self, cfg, run_id: str, client, uri: str):
        self.cfg, self.run_id, self.client, self.uri = cfg, run_id, client, uri
        self.sender = _Sender(client, run_id, cfg.mlflow.queue_size, cfg.mlflow.retry_s)
        self.sender.start()

    @classmethod
    def start(cls, cfg, run_id: str | None, resumed_step: int | None, config_changes: Iterable[str] = (),
              static: dict | None = None) -> "MlflowTracker | None":
        """A new run (params, config YAML, tags) or, on resume, the same run reopened with a resume tag. None
        (with a warning) when the tracking store cannot be reached at the start: training goes on without it."""
        from mlflow.tracking import MlflowClient

        # MLflow's HTTP client retries for minutes by itself; our sender retries instead, so that it can say the
        # server is away and keep the rows meanwhile (a user's own setting wins)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        uri, artifacts = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        if run_id is None and resumed_step is not None:  # a run `knowlip mlflow sync` created after an outage
            run_id = recorded_run_id(Path(cfg.run_dir))
        record = Path(cfg.run_dir, RUN_FILE)
        if not record.is_file() or run_id is not None:  # before the first attempt: `sync` then knows where to send
            record.write_text(json.dumps({"tracking_uri": redact_text(uri), "run_id": run_id}))
        try:
            if run_id is None:
                run_id = cls._create_run(client, cfg, artifacts, static or {})
            else:
                cls._reopen(client, cfg, run_id, resumed_step, list(config_changes))
        except Exception as exc:
            log.warning("MLflow at %s unavailable at the start (%s): this run is not tracked; its metrics stay in "
                        "metrics.jsonl (`knowlip mlflow sync` uploads them later)", redact_text(uri),
                        redact_text(str(exc).splitlines()[0]))
            return None
        Path(cfg.run_dir, RUN_FILE).write_text(json.dumps({"tracking_uri": redact_text(uri), "run_id": run_id}))
        return cls(cfg, run_id, client, uri)

    @staticmethod
    def _create_run(client, cfg, artifacts: str | None, static: dict) -> str:
        from knowlip.config import public_tree, to_yaml

        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         client.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts))
        tags = {"knowlip.run_dir": str(Path(cfg.run_dir).resolve()), "knowlip.resumes": "0",
                **{f"knowlip.{k}": str(v) for k, v in static.items()}}
        run = client.create_run(experiment_id, run_name=cfg.mlflow.run_name or Path(cfg.run_dir).name, tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(public_tree(cfg)).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        client.log_text(run_id, to_yaml(cfg, resolve=True), "config.yaml")
        return run_id

    @staticmethod
    def _reopen(client, cfg, run_id: str, step: int | None, changes: list[str]) -> None:
        run = client.get_run(run_id)
        count = int(run.data.tags.get("knowlip.resumes", "0")) + 1
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "knowlip.resumes", str(count))
        client.set_tag(run_id, f"knowlip.resume.{count}", f"step {step} at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        if changes:  # params are immutable: a changed config is recorded as a tag
            client.set_tag(run_id, f"knowlip.resume.{count}.config_changes", "; ".join(changes)[:5000])

    def log_metrics(self, step: int, row: dict) -> None:
        """Never blocks: the row goes on the sender's bounded buffer."""
        values = numeric(row)
        if values:
            self.sender.put(step, values)

    def event(self, name: str, step: int) -> None:
        """A checkpoint or another event, as a metric series (value = step) so the UI plots when it happened."""
        self.sender.put(step, {f"event_{name}": float(step)})

    def log_artifact_text(self, text: str, path: str) -> None:
        try:
            self.client.log_text(self.run_id, text, path)
        except Exception as exc:
            log.warning("MLflow: could not store %s (%s)", path, redact_text(str(exc).splitlines()[0]))

    def finish(self, status: str, report_dir: Path | None = None, timeout: float = 30.0, stop: str = "") -> None:
        """Send what is buffered, store the report, set the run's status (run_tracking.end_status) and say why
        in the `knowlip.stop` tag."""
        self.sender.close(timeout)
        if self.sender.rows or self.sender.dropped:
            log.warning("MLflow: %d metric rows could not be sent (%d dropped from the buffer): they are in "
                        "metrics.jsonl; `knowlip mlflow sync %s` uploads them", len(self.sender.rows),
                        self.sender.dropped, self.cfg.run_dir)
        try:
            if report_dir is not None and report_dir.is_dir():
                self.client.log_artifacts(self.run_id, str(report_dir), "report")
            if stop:
                self.client.set_tag(self.run_id, "knowlip.stop", redact_text(stop))
            with redacted_stdout():  # MLflow prints the run's URL
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("MLflow: could not close the run (%s)", redact_text(str(exc).splitlines()[0]))


class SystemMetrics:
    """MLflow's system-metrics sampler for this node (CPU, memory, disk, network; GPU with pynvml), named by
    host so that several nodes' series stay apart."""

    def __init__(self, uri: str, run_id: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=socket.gethostname(),
                                            tracking_uri=uri, resume_logging=True)
        self.monitor.start()

    def stop(self) -> None:
        try:
            self.monitor.finish()
        except Exception as exc:  # the server went away: system metrics are best effort
            log.warning("MLflow system metrics: %s", redact_text(str(exc).splitlines()[0]))


def recorded_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def sync(run_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """Upload the rows of <run_dir>/metrics.jsonl that the run's history lacks (creating the run when the
    tracking store was away for the whole job). `uri`: where to, instead of the one the run recorded. Returns
    (run id, rows sent)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from knowlip.config import load_config

    run_dir = Path(run_dir)
    record = run_dir / RUN_FILE
    if not record.is_file():
        raise FileNotFoundError(f"{record}: this run kept no MLflow record (was mlflow.enabled false?)")
    info = json.loads(record.read_text())
    uri = uri or info["tracking_uri"]
    if MASK in uri:  # its credentials were not written down: they come from the environment
        uri = os.environ.get("MLFLOW_TRACKING_URI", uri.replace(f"{MASK}@", ""))
    client = MlflowClient(tracking_uri=uri)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if info.get("run_id") is None:
        cfg = load_config(run_dir / "config.yaml")
        info["run_id"] = MlflowTracker._create_run(client, cfg, None, {"created_by": "knowlip mlflow sync"})
        last = rows[-1]["step"] if rows else 0
        client.set_terminated(info["run_id"], status="FINISHED" if last >= cfg.train.steps else "KILLED")
        record.write_text(json.dumps({"tracking_uri": redact_text(uri), "run_id": info["run_id"]}))
    have = {m.step for m in client.get_metric_history(info["run_id"], "loss")}
    missing = [r for r in rows if r["step"] not in have]
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, r["step"]) for r in missing for k, v in numeric(r).items()]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(info["run_id"], metrics=metrics[i:i + BATCH], synchronous=True)
    return info["run_id"], len(missing)
