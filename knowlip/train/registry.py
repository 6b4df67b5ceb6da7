"""The trained model into the MLflow Model Registry (`knowlip export SOURCE --register NAME`, or
`mlflow.register_as` at the end of a run): the transformers export logged as a pyfunc model of the run that
trained it (knowlip/track/blip_pyfunc.py), a new version under NAME, tagged with its lineage.

Lineage tags (`knowlip.*`): the training run's id, the checkpoint and its step, the git commit the run was
trained from, the dataset's fingerprint and sample count, the config hash, and the run's latest eval figures.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).parents[1] / "track" / "blip_pyfunc.py"
MODEL_NAME_IN_RUN = "model"


def lineage(source: str | Path) -> dict[str, str]:
    """What the registered version says of where it came from (the training run's id under "run_id")."""
    from knowlip.train import checkpoint as ckpt
    from knowlip.train.export import origin

    where = origin(source)
    facts = {"checkpoint": str(where.get("checkpoint")), "step": str(where.get("step")), "run_id": ""}
    path = Path(where["checkpoint"]) if where.get("checkpoint") else None
    if path is not None and ckpt.read_meta(path) is not None:  # an export's checkpoint may be gone by now
        components, _ = ckpt.load_global_state(path)
        loader = components.get("loader", {})
        facts.update(run_id=components.get("trainer", {}).get("mlflow_run_id") or "",
                     config_hash=ckpt.read_meta(path).get("config_hash", ""),
                     dataset_fingerprint=str(loader.get("fingerprint", "")),
                     dataset_samples=str(loader.get("num_samples", "")))
    return facts


def register(source: str | Path, name: str, tracking_uri: str | None = None) -> dict:
    """Export `source` for transformers, log it as a model of its training run, register a version under `name`
    and tag it. Returns {"name", "version", "run_id", "model_uri", "tags"}."""
    import mlflow
    from mlflow import MlflowClient

    from knowlip.train.export import export_hf, load_model
    from knowlip.track.mlflow_tracker import recorded_run_id, using_store
    from knowlip.track.mlflow_tracker import tracking_uri as configured_uri

    loaded = load_model(source)
    cfg = loaded[2]
    uri = tracking_uri or configured_uri(cfg)[0]
    facts = lineage(source)
    run_id = facts.pop("run_id", "") or recorded_run_id(Path(cfg.run_dir))
    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp, using_store(uri):
        folder = export_hf(source, Path(tmp) / "blip", loaded)
        previous = client.get_run(run_id).info if run_id else None
        if previous is None:  # trained without MLflow: a run of its own, saying so
            experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow.experiment)
            run_id = mlflow.start_run(experiment_id=experiment_id,
                                      run_name=f"{Path(cfg.run_dir).name} (registered)").info.run_id
            mlflow.set_tag("knowlip.note", "the training job logged no MLflow run; this one holds the model")
        else:
            mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE),
                                           artifacts={"blip": str(folder)}, signature=_signature(folder),
                                           pip_requirements=_requirements(), registered_model_name=name)
        finally:
            mlflow.end_run()
            if previous is not None and previous.status != "RUNNING":  # the run's own end stays as it was
                client.set_terminated(run_id, status=previous.status, end_time=previous.end_time)
    run = client.get_run(run_id)
    tags = {"knowlip.run_id": run_id, "knowlip.git_commit": run.data.tags.get("knowlip.git_commit", "-"),
            **{f"knowlip.{k}": v for k, v in facts.items()},
            **{f"knowlip.{k}": str(v) for k, v in run.data.metrics.items() if k.startswith("eval_")}}
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    log.info("registered %s version %s from run %s (step %s)", name, version, run_id, facts.get("step"))
    return {"name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
            "tags": tags}


def register_finished_model(run_dir: Path, name: str, uri: str | None) -> None:
    """mlflow.register_as at the end of a run: a failure is logged with the command that retries it, and does not
    fail the finished run."""
    try:
        register(run_dir, name, uri)
    except Exception as exc:  # noqa: BLE001 - the training itself succeeded; say what failed and how to redo it
        log.error("registering the model as %r failed (%s: %s); the run is saved: retry with `knowlip export %s "
                  "--out <dir> --format hf --register %s`", name, type(exc).__name__, exc, run_dir, name)


def _signature(folder: Path):
    """Chips and token ids in, the normalised ITC embeddings out."""
    import json

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    config = json.loads((folder / "config.json").read_text())
    size, embed = config["vision_config"]["image_size"], config["image_text_hidden_size"]
    channels = config["knowlip"]["in_channels"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "pixel_values"),
                       TensorSpec(np.dtype(np.int64), (-1, -1), "input_ids"),
                       TensorSpec(np.dtype(np.int64), (-1, -1), "attention_mask")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed), "image_embeds"),
                        TensorSpec(np.dtype(np.float32), (-1, embed), "text_embeds")]))


def _requirements() -> list[str]:
    import importlib.metadata as md

    return [f"{p}=={md.version(p).split('+')[0]}" for p in ("mlflow", "torch", "transformers", "numpy")]
