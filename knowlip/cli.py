"""The `knowlip` command: subcommands parse their arguments and call the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from knowlip.choices import CAPTION_FIELDS, EXPORT_DTYPES
from knowlip.config import ConfigError, DataConfig, EvalConfig, load_config, to_yaml
from knowlip.launch.run_lock import RunLocked
from knowlip.launch.slurm import SlurmError
from knowlip.redact import redact_text


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (merged over the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. data.batch_size=64")


def _config(args: argparse.Namespace, extra: Sequence[str] = ()):
    return load_config(args.config, list(args.overrides) + list(extra))


def cmd_config_show(args: argparse.Namespace) -> int:
    path = args.config
    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0] and path is None:  # `knowlip config show FILE key=value`
        path, overrides = overrides[0], overrides[1:]
    print(to_yaml(load_config(path, overrides), resolve=True), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from knowlip.sar.synth import synthesise_from_config

    cfg = _config(args, [f"synth.out_dir={args.out}"] if args.out else [])
    paths = synthesise_from_config(cfg)
    print(f"wrote {len(paths)} scenes and captions.jsonl to {cfg.synth.out_dir}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from knowlip.data.pack import pack

    # `knowlip pack DIR ... --out OUT`: a positional without '=' that exists on disk is an input, not an override
    positional = [o for o in args.overrides if "=" not in o and Path(o).exists()]
    args.overrides = [o for o in args.overrides if o not in positional]
    inputs = list(args.inputs or []) + positional
    extra = []
    if inputs:
        extra.append("pack.inputs=[" + ",".join(json.dumps(str(i)) for i in inputs) + "]")
    if args.out:
        extra.append(f"pack.out_dir={args.out}")
    if args.jobs:
        extra.append(f"pack.jobs={args.jobs}")
    if args.captions:
        extra.append(f"pack.captions={args.captions}")
    if args.overwrite:
        extra.append("pack.overwrite=true")
    cluster_overrides, args.overrides = _split_cluster_overrides(args.overrides)
    cfg = _config(args, extra)
    if args.cluster:  # a Slurm array of --array tasks, then one merge here
        from knowlip.data.pack import pack_on_slurm
        from knowlip.launch import slurm

        profile = slurm.load_profile(args.cluster, cluster_overrides)
        slurm.apply_environment(profile)
        index_path, report, job_ids = pack_on_slurm(cfg, profile, args.array)
        print(f"packed on Slurm by array job {job_ids[0].split('_')[0]} ({len(job_ids)} tasks), merged here")
    else:
        index_path, report = pack(cfg)
    print(f"packed {report.samples} samples from {report.scenes_packed} scenes into {cfg.pack.out_dir} "
          f"({report.seconds:.1f} s)")
    for skipped in report.skipped_files:
        print(f"  skipped {skipped['file']}: {skipped['reason']}")
    for err in report.caption_errors:
        print(f"  caption error: {err}")
    if report.chips_without_caption:
        print(f"  {report.chips_without_caption} chips had no caption (pack.missing_caption="
              f"{cfg.pack.missing_caption})")
    if report.samples == 0:
        print("error: no samples were packed", file=sys.stderr)
        return 1
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from knowlip.data.inspect import format_report, inspect_shards

    report = inspect_shards(args.shards)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from knowlip.data.verify import format_report, verify_shards

    report = verify_shards(args.shards, args.jobs)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_data_replay(args: argparse.Namespace) -> int:
    from knowlip.data.replay import replay, write_records

    records, state = replay(args.shards, args.world_size, args.workers, args.batch_size, args.epochs, args.seed,
                            args.shuffle_block, not args.keep_last, args.stop_after_steps, args.resume_state)
    write_records(records, sys.stdout)
    if args.save_state:
        Path(args.save_state).write_text(json.dumps(state, indent=1))
        print(f"saved loader state (epoch {state['epoch']}, cursor {state['cursor']}) to {args.save_state}",
              file=sys.stderr)
    return 0


def _train_command(args: argparse.Namespace) -> list[str]:
    """The command every local rank runs: this same `knowlip train` with the same arguments."""
    return [sys.executable, "-m", "knowlip.cli", "train"] + (["-c", args.config] if args.config else []) + \
        list(args.overrides) + ([f"log.level={args.log_level}"] if args.log_level else [])


def cmd_train(args: argparse.Namespace) -> int:
    """One entry point: a rank of a torchrun/Slurm job, or the launcher of `dist.nproc_per_node` local ranks."""
    from knowlip.config import accumulation_steps
    from knowlip.launch.local import local_rank_count, rank_env, spawn_local_ranks
    from knowlip.launch.run_lock import lock_run
    from knowlip.logging_setup import configure_logging
    from knowlip.train.preflight import preflight

    cfg = _config(args, [f"log.level={args.log_level}"] if args.log_level else [])  # fails before any process
    ranks = rank_env()
    if ranks is None or ranks.rank == 0:  # what this process can check alone, before any rank starts
        nothing_to_do = preflight(cfg)
        if nothing_to_do:
            print(nothing_to_do)
            return 0
    if ranks is None and cfg.train.engine == "deepspeed":
        nproc = local_rank_count(cfg.dist.nproc_per_node)
        accumulation_steps(cfg, nproc)
        if nproc > 1:
            lock_run(cfg)  # held by this launcher for the job's life (its rank 0 sees that)
            return spawn_local_ranks(nproc, _train_command(args))
    configure_logging(ranks.rank if ranks else None, cfg.log.level, cfg.log.all_ranks, cfg.log.json)
    return _train_rank(cfg, ranks)


def _train_rank(cfg, ranks) -> int:
    from knowlip.launch.signals import StopRequest
    from knowlip.train.rank_main import train_rank

    return train_rank(cfg, ranks, StopRequest(announce=ranks is None or ranks.rank == 0).install())[0]


def _split_cluster_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """`cluster.KEY=VALUE` go to the cluster profile, the rest to the training config."""
    cluster = [o for o in overrides if o.startswith("cluster.")]
    return cluster, [o for o in overrides if not o.startswith("cluster.")]


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit training to Slurm with submitit; the config and the request are checked before sbatch."""
    from knowlip.config import accumulation_steps, check_no_literal_secrets
    from knowlip.launch import slurm
    from knowlip.launch.run_lock import check_unlocked
    from knowlip.train.preflight import preflight
    from knowlip.train.rank_main import SlurmTrain

    cluster_overrides, overrides = _split_cluster_overrides(args.overrides)
    profile = slurm.load_profile(args.cluster, cluster_overrides)
    cfg = load_config(args.config, overrides)
    accumulation_steps(cfg, profile.nodes * profile.tasks_per_node)  # global batch fits the world size
    run_dir = Path(cfg.run_dir).resolve()
    cfg = load_config(args.config, overrides + [f"run_dir={run_dir}", "resume=auto"])
    check_no_literal_secrets(cfg, "the Slurm job")
    check_unlocked(cfg)
    nothing_to_do = preflight(cfg)
    if nothing_to_do:
        print(f"{nothing_to_do}; not submitted")
        return 0
    slurm.apply_environment(profile)
    task = SlurmTrain(to_yaml(cfg), run_dir, profile.max_requeues)
    entry = slurm.submit(task, profile, job_name=args.name or f"knowlip-{run_dir.name}")
    print(f"submitted job {entry['job_id']} ({entry['tasks']} tasks on {profile.nodes} node(s), cluster "
          f"{profile.name})\n  logs: {entry['log_dir']}\n  run:  {run_dir}")
    if cfg.mlflow.enabled:
        from knowlip.track.mlflow_tracker import is_file_store, tracking_uri

        if profile.nodes > 1 and is_file_store(tracking_uri(cfg)[0]):
            print(f"  note: {profile.nodes} nodes with a file MLflow store ({redact_text(tracking_uri(cfg)[0])}): only "
                  "rank 0's node writes to it (a file is not safe from several nodes; other nodes' system metrics "
                  "are off). For every node's metrics run a tracking server (`mlflow server`) and set "
                  "mlflow.tracking_uri=http://HOST:PORT")
        print(f"  MLflow: {redact_text(tracking_uri(cfg)[0])}, experiment {cfg.mlflow.experiment!r} (the run id "
              f"appears in {run_dir / 'mlflow.json'} and `knowlip jobs` once the job starts; requeues continue "
              "that run)")
    if not args.wait:
        return 0
    try:
        entry["job"].results()
    except Exception as exc:  # submitit raises the job's failure
        print(f"job {entry['job_id']} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
              file=sys.stderr)
        return 1
    slurm.wait_until_finished(entry["job_id"], timeout=30)  # so that `knowlip jobs` agrees at once
    print(f"job {entry['job_id']} finished")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from knowlip.launch import slurm

    profile = _slurm_profile(args)
    rows = [slurm.job_summary(e) for e in slurm.registry_entries(profile.folder)[-args.last:]]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'job':>8}  {'state':<12}{'requeues':>9}{'step':>7}  run / why")
    for r in rows:
        print(f"{r['job_id']:>8}  {r['state']:<12}{r['requeues']:>9}{str(r['step'] or '-'):>7}  {r['run_dir']}"
              + (f"  (MLflow run {r['mlflow_run']})" if r["mlflow_run"] else "")
              + (f"\n{'':>38}{r['why']}" if r["why"] else ""))
    return 0


def _slurm_profile(args: argparse.Namespace):
    """The --cluster profile, its environment applied (SLURM_CONF and the like) for the Slurm commands."""
    from knowlip.launch import slurm

    profile = slurm.load_profile(args.cluster)
    slurm.apply_environment(profile)
    return profile


def _registry_entry(args: argparse.Namespace):
    from knowlip.launch import slurm

    profile = _slurm_profile(args)
    entry = next((e for e in slurm.registry_entries(profile.folder) if e["job_id"] == str(args.job_id)), None)
    if entry is None:
        raise slurm.SlurmError(f"job {args.job_id} is not in {Path(profile.folder).resolve() / slurm.REGISTRY} "
                               "(submitted with another cluster profile or folder?)")
    return slurm, entry


def cmd_logs(args: argparse.Namespace) -> int:
    slurm, entry = _registry_entry(args)
    path = slurm.log_path(entry, args.rank, "err" if args.stderr else "out")
    if args.follow:
        slurm.follow(path, lambda: slurm.job_finished(entry["job_id"]))
        return 0
    if not path.is_file():
        print(f"no log yet: {path}", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text(errors="replace"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from knowlip.launch import slurm

    _slurm_profile(args)
    slurm.cancel(str(args.job_id))
    print(f"cancelled job {args.job_id}")
    return 0


def cmd_mlflow_sync(args: argparse.Namespace) -> int:
    from knowlip.track.mlflow_tracker import sync

    run_id, sent = sync(Path(args.run_dir), args.tracking_uri)
    print(f"MLflow run {run_id}: uploaded {sent} metric rows that it lacked")
    return 0


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    """The UI on a run's store: RUN_DIR (its mlflow.json), or the store a config names (-c and overrides)."""
    from knowlip.track.mlflow_tracker import RUN_FILE, default_store, serve_ui, tracking_uri

    overrides = list(args.overrides)
    run_dir = Path(overrides.pop(0)) if overrides and "=" not in overrides[0] else None
    run_id = None
    if run_dir is not None:
        record = run_dir / RUN_FILE
        if not record.is_file():
            raise FileNotFoundError(f"{record}: not found (is {run_dir} a run folder of a tracked run?)")
        info = json.loads(record.read_text())
        uri, run_id = info["tracking_uri"], info.get("run_id")
        local_uri, artifacts = default_store(run_dir)
        artifacts = artifacts if uri == local_uri else None
    else:
        uri, artifacts = tracking_uri(load_config(args.config, overrides))
    if uri.startswith(("http://", "https://")):
        print(f"the run's tracking server has its own UI: open {redact_text(uri)}")
        return 0
    return serve_ui(uri, artifacts, run_id, args.host, args.port)


def cmd_export(args: argparse.Namespace) -> int:
    from knowlip.train.export import HF_DECODER, export_checkpoint, export_hf

    if args.format == "hf":
        export_hf(args.source, args.out)
        print(f"exported {args.out} (transformers BlipForImageTextRetrieval) and {args.out}/{HF_DECODER} "
              "(BlipForConditionalGeneration); config.json \"knowlip\" says how to build the input")
    else:
        path = export_checkpoint(args.source, args.out, args.dtype)
        print(f"exported {path} ({args.dtype}), config.yaml and tokenizer/ to {args.out}")
    if args.register:
        from knowlip.train.registry import register

        version = register(args.source, args.register, args.tracking_uri)
        print(f"registered {version['model_uri']} from run {version['run_id']} (step {version['tags'].get('knowlip.step')})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Zero-shot retrieval and classification of a checkpoint, export or run on held-out shards; one process, or
    every rank of a torchrun/Slurm job (each embeds its slice)."""
    import torch

    from knowlip.eval.zero_shot import format_report, run_eval
    from knowlip.distributed import init_plain_process_group
    from knowlip.launch.local import rank_env, resolve_device
    from knowlip.text.tokenizer import CaptionTokenizer
    from knowlip.train.export import load_model

    ranks = rank_env()
    device = resolve_device("auto", ranks.local_rank if ranks else 0)
    if ranks is not None and ranks.world_size > 1:
        init_plain_process_group(ranks, "nccl" if device.type == "cuda" else "gloo")
    model, tokenizer, cfg = load_model(args.source, device)
    text = CaptionTokenizer(tokenizer, cfg.data.max_text_len)
    result = run_eval(model, args.shards, text, cfg.norm, device, torch.float32, args.batch_size, args.fields)
    if ranks is None or ranks.rank == 0:
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
    return 0


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    import time

    from knowlip.train.checkpoint import CHECKPOINTS_DIR, abandoned_branches, latest_complete, list_checkpoints

    given = Path(args.run_dir)
    root = given / CHECKPOINTS_DIR if (given / CHECKPOINTS_DIR).is_dir() else given
    infos, branches = list_checkpoints(root), abandoned_branches(root)
    if not infos and not branches:
        print(f"no checkpoints in {given}")
        return 1
    latest = latest_complete(root)
    print(f"{'checkpoint':<28} {'step':>8} {'saved':<19} {'ranks':>5} {'engine':<7} {'MiB':>9}  state")

    def row(c, state: str) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.time)) if c.time else "-"
        print(f"{c.path.name:<28} {c.step:>8} {when:<19} {c.world_size or '-':>5} {c.engine_label:<7} "
              f"{c.bytes / 2**20:>9.1f}  {state}")

    for c in infos:  # in save order
        row(c, "INCOMPLETE (never resumed)" if not c.complete else
            "complete, latest (resume=auto)" if c.path == latest else "complete")
    for folder, note, kept in branches:
        print(f"abandoned: {folder} ({note.get('reason', '?')}; never resumed)")
        for c in kept:
            row(c, "abandoned")
    return 0


def cmd_ckpt_universal(args: argparse.Namespace) -> int:
    from knowlip.train.checkpoint import convert_to_universal, resolve_checkpoint

    out = convert_to_universal(resolve_checkpoint(args.checkpoint))
    print(f"universal checkpoint in {out}")
    return 0


EXAMPLES = {  # shown at the end of each subcommand's --help
    "config show": "knowlip config show -c configs/default.yaml data.batch_size=64",
    "synth": "knowlip synth --out runs/world synth.num_scenes=100",
    "pack": "knowlip pack /data/scenes --captions caps.jsonl --out /data/shards --jobs 8",
    "train": "knowlip train -c configs/default.yaml train.steps=200 dist.nproc_per_node=2",
    "submit": "knowlip submit --cluster h100 -c configs/sentinel1.yaml cluster.nodes=4",
    "jobs": "knowlip jobs --cluster local --last 5",
    "logs": "knowlip logs 42 --rank 1 --follow",
    "cancel": "knowlip cancel 42",
    "mlflow sync": "knowlip mlflow sync runs/quickstart --tracking-uri http://mlflow.example.org:5000",
    "mlflow ui": "knowlip mlflow ui runs/quickstart --port 5001",
    "export": "knowlip export runs/quickstart --out exported/ --dtype bf16\n"
              "  knowlip export runs/quickstart --out exported-hf/ --format hf --register sar-knowlip",
    "eval": "knowlip eval exported/ --shards /data/heldout --fields water terrain",
    "ckpt ls": "knowlip ckpt ls runs/quickstart",
    "ckpt universal": "knowlip ckpt universal runs/quickstart/checkpoints/step_00000040",
    "data inspect": "knowlip data inspect s3://bucket/shards --json",
    "data verify": "knowlip data verify /data/shards --jobs 4",
    "data replay": "knowlip data replay /data/shards --world-size 4 --batch-size 64 --stop-after-steps 100",
}


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every subcommand, nested ones as 'ckpt ls'."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def version_text() -> str:
    """knowlip, torch, deepspeed and CUDA versions (`knowlip --version`)."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (f"knowlip {version('knowlip')}\ntorch {torch.__version__} (CUDA {cuda}; {gpus} GPU(s) visible)\n"
            f"deepspeed {version('deepspeed')}\nmlflow {version('mlflow')}")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of knowlip, torch (CUDA), "
                         "deepspeed and mlflow, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _commands()
    for name, sub in _subparsers(parser):
        if name in EXAMPLES:
            sub.epilog = f"example:\n  {EXAMPLES[name]}"
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _commands() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowlip", description="SAR-KnowLIP pretraining toolkit")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="what to log (default INFO; train: overrides log.level of the config)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show the resolved configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the config after merging defaults <- FILE <- overrides")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("synth", help="generate synthetic SAR GeoTIFF scenes with captions")
    p.add_argument("--out", help="output folder (synth.out_dir)")
    _add_config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pack", help="pack GeoTIFFs + captions into WebDataset shards")
    p.add_argument("--inputs", nargs="+", help="GeoTIFF files or folders (pack.inputs); existing paths given "
                   "without --inputs count too")
    p.add_argument("--captions", help="caption JSONL (pack.captions)")
    p.add_argument("--out", help="output folder (pack.out_dir)")
    p.add_argument("--jobs", type=int, help="processes reading and encoding scenes (pack.jobs); same output")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in --out once the new one is "
                   "complete (pack.overwrite); without it a non-empty --out is refused")
    p.add_argument("--cluster", help="pack on Slurm with this cluster profile (a submitit array job, then a merge)")
    p.add_argument("--array", type=int, default=4, help="array tasks for --cluster (each packs a share of scenes)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("train", help="train on packed shards: DeepSpeed ZeRO-3 over local ranks, torchrun or Slurm")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit training to Slurm (submitit): one task per GPU, requeue on preemption")
    p.add_argument("--cluster", required=True, help="cluster profile: cluster/NAME.yaml or a path")
    p.add_argument("--name", help="job name (default knowlip-<run folder>)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; non-zero exit if it failed")
    _add_config_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="this user's knowlip Slurm jobs: state, requeues, step reached, why it ended")
    p.add_argument("--cluster", default="local", help="cluster profile (its folder holds the job registry)")
    p.add_argument("--last", type=int, default=20, help="how many of the newest submissions")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", help="a Slurm job's log (one rank)")
    p.add_argument("job_id", help="the job id `knowlip submit` printed (see `knowlip jobs`)")
    p.add_argument("--rank", type=int, default=0, help="whose log: the rank (Slurm task) number")
    p.add_argument("--stderr", action="store_true", help="the error stream instead of the output")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--cluster", default="local", help="cluster profile the job was submitted with")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a Slurm job")
    p.add_argument("job_id", help="the job id `knowlip submit` printed")
    p.add_argument("--cluster", default="local", help="cluster profile the job was submitted with")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("mlflow", help="MLflow: upload what a run could not send, or start the UI on a run")
    msub = p.add_subparsers(dest="mlflow_command", required=True)
    sync = msub.add_parser("sync", help="upload the metrics.jsonl rows the run's MLflow history lacks")
    sync.add_argument("run_dir", help="the run folder (its mlflow.json says where its run is)")
    sync.add_argument("--tracking-uri", help="send to this tracking URI instead of the one the run recorded")
    sync.set_defaults(func=cmd_mlflow_sync)
    ui = msub.add_parser("ui", help="start the MLflow UI on a run's store and print the run's page")
    ui.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    ui.add_argument("-c", "--config", help="a config whose MLflow store to open (instead of RUN_DIR)")
    ui.add_argument("overrides", nargs="*", metavar="RUN_DIR|key=value",
                    help="a run folder, or config overrides naming the store")
    ui.set_defaults(func=cmd_mlflow_ui)

    p = sub.add_parser("export", help="a checkpoint (or run folder) -> knowlip's or transformers' model folder, "
                       "optionally registered in MLflow")
    p.add_argument("source", help="a checkpoint folder, a run folder (its newest complete checkpoint) or an export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="knowlip", choices=("knowlip", "hf"),
                   help="knowlip: safetensors + config.yaml + tokenizer/ (knowlip.train.export.load_exported); hf: "
                   "transformers' BlipForImageTextRetrieval, and BlipForConditionalGeneration in decoder/")
    p.add_argument("--dtype", default=EXPORT_DTYPES[0], choices=EXPORT_DTYPES,
                   help="weights' dtype in a knowlip export (hf: float32)")
    p.add_argument("--register", metavar="NAME", help="also register the model under NAME in MLflow's Model Registry, "
                   "as a model of the run that trained it, with its lineage as version tags")
    p.add_argument("--tracking-uri", help="the MLflow store to register in (default: the run's, as it trained)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="zero-shot retrieval and clause classification on held-out shards")
    p.add_argument("source", help="a checkpoint, an export folder or a run folder (its newest checkpoint)")
    p.add_argument("--shards", required=True, help="held-out shard folder (index.json)")
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="chips embedded at a time")
    p.add_argument("--fields", nargs="+", default=EvalConfig().fields, choices=CAPTION_FIELDS, metavar="FIELD",
                   help=f"clauses to classify by, from: {', '.join(CAPTION_FIELDS)}")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ckpt", help="list and convert checkpoints")
    ksub = p.add_subparsers(dest="ckpt_command", required=True)
    ls = ksub.add_parser("ls", help="checkpoints of a run: step, time, size, completeness")
    ls.add_argument("run_dir", help="a run folder (or its checkpoint folder)")
    ls.set_defaults(func=cmd_ckpt_ls)
    uni = ksub.add_parser("universal", help="convert to DeepSpeed's universal form (resume at any world size)")
    uni.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    uni.set_defaults(func=cmd_ckpt_universal)

    p = sub.add_parser("data", help="inspect and audit shards and the loader")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ins = dsub.add_parser("inspect", help="counts, bands, extent and caption statistics of a shard folder")
    ins.add_argument("shards", help="a folder or object-store URL holding index.json (endpoint and credentials "
                     "from the environment: AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    ins.set_defaults(func=cmd_data_inspect)
    ver = dsub.add_parser("verify", help="every shard's sha256 and every sample's checksums; non-zero exit on damage")
    ver.add_argument("shards", help="shard folder or object-store URL (index.json)")
    ver.add_argument("--jobs", type=int, default=1, help="shards checked in parallel")
    ver.add_argument("--json", action="store_true", help="print JSON instead of text")
    ver.set_defaults(func=cmd_data_verify)
    rep = dsub.add_parser("replay", help="print the sample keys each rank gets at each step (one JSON line a step)")
    rep.add_argument("shards", help="a folder holding index.json")
    rep.add_argument("--world-size", type=int, default=1, help="ranks to replay")
    rep.add_argument("--workers", type=int, default=DataConfig.num_workers, help="loader workers per rank")
    rep.add_argument("--batch-size", type=int, required=True, help="per-rank batch size")
    rep.add_argument("--epochs", type=int, default=1, help="epochs to replay")
    rep.add_argument("--seed", type=int, default=DataConfig.seed, help="data.seed of the run")
    rep.add_argument("--shuffle-block", type=int, default=DataConfig.shuffle_block, help="data.shuffle_block of the run")
    rep.add_argument("--keep-last", action="store_true", help="keep the smaller last step instead of dropping it")
    rep.add_argument("--stop-after-steps", type=int, help="stop after N global steps (simulates an interruption)")
    rep.add_argument("--save-state", help="write the loader state here when stopping")
    rep.add_argument("--resume-state", help="resume from a state written by --save-state")
    rep.set_defaults(func=cmd_data_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # overrides after an option (`pack DIR --out OUT key=value`) land here; anything else is an error
        if not hasattr(args, "overrides") or any(u.startswith("-") for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    func: Callable[[argparse.Namespace], int] = args.func
    from knowlip.logging_setup import configure_logging

    configure_logging(None, args.log_level or "INFO")  # `train` sets it again from the config (log.*) and its rank
    try:
        return func(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (training saves first: knowlip.launch.signals)
        print(f"knowlip {args.command}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"config error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except SlurmError as exc:
        print(f"slurm: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except RunLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # FileNotFoundError, StorageError (naming the URL), ShardError
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
