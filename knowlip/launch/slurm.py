"""Slurm through submitit: cluster profiles, submission, the task every rank runs, job listing, logs, cancel.

A cluster profile (`cluster/NAME.yaml`, or a path) says what to ask Slurm for; `cluster.KEY=VALUE` on the
command line overrides it. The request is checked against the partition (sinfo) before sbatch.

Preemption and time limits: Slurm sends SIGUSR2 `signal_delay_s` before the limit (or `scancel
--signal=USR2`); SIGTERM when it preempts the job (PreemptMode=REQUEUE: at the start of the partition's
GraceTime), and also on `scancel` or at a time limit. submitit's own USR2 handler calls checkpoint() on rank 0
and then requeues and exits inside the handler, before any collective save could run, so `SlurmTask` installs
its own handlers on every rank instead: a signal only sets the stop flag; the trainer's ranks agree on it at
the next step boundary, save one checkpoint together and return. Then rank 0 requeues the job (`scontrol
requeue`, at most `max_requeues` times) after USR2, or after SIGTERM when Slurm is preempting it (its
PreemptTime is set): a job that ends within its grace time is not requeued by Slurm (it counts as completed),
and requeueing at once frees the nodes for the preempting job sooner. Any other SIGTERM (a cancel) saves and
ends the job. The requeued job resumes from that checkpoint (resume=auto). A job that fails for a real error
raises, is marked FAILED and is not requeued; `srun --kill-on-bad-exit` ends the other ranks at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from knowlip.launch.signals import StopRequest

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"
REGISTRY = "jobs.jsonl"
STATUS_FILE = "slurm_status.json"


class SlurmError(RuntimeError):
    """A profile, request or Slurm command that cannot work, said in words."""


@dataclass
class ClusterProfile:
    name: str = "?"
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # one per GPU on GPU nodes
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None  # per node
    time_min: int = 60
    signal_delay_s: int = 120
    max_requeues: int = 5
    exclusive: bool = False
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch_extra: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)  # set for sbatch and the job, unless already set
    folder: str = "runs/slurm"
    python: Optional[str] = None  # the interpreter on the nodes; default: this one


def load_profile(name_or_path: str, overrides: list[str] = ()) -> ClusterProfile:
    """The profile `cluster/NAME.yaml` (or a YAML path), with `cluster.KEY=VALUE` overrides, checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(name_or_path)
    if not path.suffix:
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise SlurmError(f"no cluster profile {name_or_path!r} ({path}); known: {', '.join(known) or 'none'}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterProfile(name=path.stem)), OmegaConf.load(path),
                                 OmegaConf.from_dotlist([o.removeprefix("cluster.") for o in overrides]))
    except OmegaConfBaseException as exc:
        raise SlurmError(f"cluster profile {path}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    profile = ClusterProfile(**OmegaConf.to_container(merged))
    check_profile(profile)
    return profile


def check_profile(p: ClusterProfile) -> None:
    """What makes no sense whatever the cluster says."""
    positive = {"nodes": p.nodes, "tasks_per_node": p.tasks_per_node, "cpus_per_task": p.cpus_per_task,
                "time_min": p.time_min}
    for key, value in positive.items():
        if value < 1:
            raise SlurmError(f"cluster profile {p.name!r}: {key}={value} must be at least 1")
    if p.gpus_per_node < 0 or p.max_requeues < 0 or p.signal_delay_s < 0:
        raise SlurmError(f"cluster profile {p.name!r}: gpus_per_node, max_requeues and signal_delay_s cannot be "
                         "negative")
    if p.gpus_per_node and p.tasks_per_node != p.gpus_per_node:
        raise SlurmError(f"cluster profile {p.name!r}: tasks_per_node={p.tasks_per_node} but gpus_per_node="
                         f"{p.gpus_per_node}: knowlip runs one task (rank) per GPU")
    if p.signal_delay_s >= p.time_min * 60:
        raise SlurmError(f"cluster profile {p.name!r}: signal_delay_s={p.signal_delay_s} is not shorter than the "
                         f"time limit ({p.time_min} min)")
    if p.mem_gb is not None and p.mem_gb <= 0:
        raise SlurmError(f"cluster profile {p.name!r}: mem_gb={p.mem_gb} must be positive")


def apply_environment(p: ClusterProfile) -> None:
    """The profile's environment, for the Slurm commands run from here and (sbatch exports it) the job."""
    for key, value in p.environment.items():
        os.environ.setdefault(str(key), str(value))


def run_slurm(args: list[str], timeout: float = 60) -> str:
    """A Slurm command's stdout; a clear SlurmError when it is missing or fails."""
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found: no Slurm client here (the local cluster: cluster/local/install.sh "
                         "and cluster/local/up.sh)")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


@dataclass
class PartitionInfo:
    name: str
    cpus: int  # per node
    memory_mb: int  # per node
    gpus: int  # per node
    nodes: int
    time_limit_min: Optional[int]  # None: infinite


def _minutes(limit: str) -> Optional[int]:
    """Slurm's [D-]HH:MM:SS / MM:SS / infinite as minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)


def partition_info(partition: Optional[str]) -> PartitionInfo:
    """The partition's nodes as sinfo reports them (the default partition when None)."""
    out = run_slurm(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D|%l"] + (["-p", partition] if partition else []))
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        raise SlurmError(f"partition {partition!r} does not exist (sinfo lists none)")
    name, cpus, mem, gres, nodes, limit = rows[0]
    gpus = sum(int(g.split(":")[-1].split("(")[0]) for g in gres.split(",") if g.startswith("gpu"))
    return PartitionInfo(name.rstrip("*"), int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus,
                         int(nodes), _minutes(limit))


def check_against_cluster(p: ClusterProfile) -> PartitionInfo:
    """The request against what the partition offers: a clear message instead of a job pending forever."""
    info = partition_info(p.partition)
    # (asked for more than offered, what was asked, what is offered)
    limits = [(p.nodes > info.nodes, f"{p.nodes} nodes", f"{info.nodes} nodes"),
              (p.tasks_per_node * p.cpus_per_task > info.cpus,
               f"{p.tasks_per_node} tasks x {p.cpus_per_task} CPUs per node", f"{info.cpus} CPUs per node"),
              ((p.mem_gb or 0) * 1024 > info.memory_mb, f"{p.mem_gb or 0:g} GB per node",
               f"{info.memory_mb / 1024:.1f} GB per node"),
              (p.gpus_per_node > info.gpus, f"{p.gpus_per_node} GPUs per node", f"{info.gpus} GPUs per node"),
              (info.time_limit_min is not None and p.time_min > info.time_limit_min, f"{p.time_min} min",
               f"a limit of {info.time_limit_min} min")]
    exceeded = [(asked, offered) for over, asked, offered in limits if over]
    if exceeded:
        raise SlurmError(f"cluster profile {p.name!r} asks for {', '.join(a for a, _ in exceeded)}; partition "
                         f"{info.name!r} offers {', '.join(o for _, o in exceeded)}")
    return info


def submission_folder(p: ClusterProfile, job_name: str) -> Path:
    """A fresh submitit folder per submission (a restarted cluster reuses job ids)."""
    return (Path(p.folder) / f"{time.strftime('%Y%m%d-%H%M%S')}-{job_name}").resolve()


def make_executor(p: ClusterProfile, folder: Path, job_name: str):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, python=p.python or sys.executable)
    extra = dict(p.sbatch_extra)
    executor.update_parameters(
        job_name=job_name, partition=p.partition, nodes=p.nodes, ntasks_per_node=p.tasks_per_node,
        cpus_per_task=p.cpus_per_task, gpus_per_node=p.gpus_per_node or None,
        mem=f"{int(p.mem_gb * 1024)}MB" if p.mem_gb else None, time=p.time_min, signal_delay_s=p.signal_delay_s,
        exclusive=p.exclusive or None, account=p.account, qos=p.qos, constraint=p.constraint,
        setup=list(p.setup), additional_parameters=extra,
        srun_args=["--kill-on-bad-exit=1"])  # one task failing ends the step: no rank left waiting in a collective
    return executor


def submit(task: "SlurmTask", p: ClusterProfile, job_name: str) -> dict:
    """sbatch the task; returns the registry entry (job id, folders). The request was checked first."""
    check_against_cluster(p)
    folder = submission_folder(p, job_name)
    executor = make_executor(p, folder, job_name)
    try:
        job = executor.submit(task)
    except Exception as exc:  # submitit wraps sbatch's refusal
        raise SlurmError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}") from None
    entry = {"job_id": str(job.job_id), "job_name": job_name, "cluster": p.name, "log_dir": str(folder),
             "run_dir": str(task.run_dir), "tasks": p.nodes * p.tasks_per_node, "submitted": time.time()}
    registry = Path(p.folder).resolve() / REGISTRY
    with registry.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    entry["job"] = job
    return entry


# ----------------------------------------------------------------------------------------------------------
# In the job: every Slurm task is one rank
# ----------------------------------------------------------------------------------------------------------


class SlurmTask:
    """The callable submitit runs in every task. Subclasses implement run_rank(stop) -> "finished" | "stopped"
    (the training; "stopped" = a signal stopped it after a checkpoint was saved by every rank)."""

    def __init__(self, run_dir: Path, max_requeues: int):
        self.run_dir, self.max_requeues = Path(run_dir), max_requeues

    def run_rank(self, stop: StopRequest) -> str:
        raise NotImplementedError

    def __call__(self) -> str:
        stop = StopRequest().install()  # replaces submitit's handlers on this rank (module docstring)
        outcome = self.run_rank(stop)
        if outcome != "stopped":
            return outcome
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        job_id = os.environ.get("SLURM_JOB_ID", "")
        preempted = stop.signum == signal.SIGTERM and being_preempted(job_id)
        if stop.signum == signal.SIGTERM and not preempted:  # scancel, a time limit reached, a node going down
            if rank == 0:
                write_status(self.run_dir, job_id, "stopped", "stopped by SIGTERM (not a preemption) with a "
                             "checkpoint; not requeued: submit again to resume")
            raise SystemExit(0)
        why = "preempted (SIGTERM in the grace time)" if preempted else f"stopped by {stop.name}"
        if restarts >= self.max_requeues:
            message = (f"{why} with a checkpoint, not requeued: {restarts} requeues already "
                       f"(cluster.max_requeues={self.max_requeues})")
            if rank == 0:
                write_status(self.run_dir, job_id, "requeue limit", message)
            raise RuntimeError(message)
        if rank == 0:
            write_status(self.run_dir, job_id, "requeued", f"{why}; requeue {restarts + 1} of at most "
                         f"{self.max_requeues}")
            try:  # at once, not at the end of the grace time: the preempting job starts sooner
                run_slurm(["scontrol", "requeue", job_id])
            except SlurmError as exc:  # already being requeued or ending
                print(f"knowlip: {exc}", file=sys.stderr)
        raise SystemExit(0)  # no result file: the job is not over, its requeued run will write one


def being_preempted(job_id: str) -> bool:
    """Slurm has chosen this job for preemption: `scontrol show job` gives its PreemptTime (None otherwise)."""
    try:
        out = run_slurm(["scontrol", "show", "job", "-o", job_id], timeout=30)
    except (SlurmError, subprocess.TimeoutExpired):
        return False
    return any(f.startswith("PreemptTime=") and f != "PreemptTime=None" for f in out.split())


def write_status(run_dir: Path, job_id: str, event: str, message: str) -> None:
    path = Path(run_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"job_id": job_id, "event": event, "message": message, "time": time.time()})
    path.write_text(json.dumps(history, indent=1))


# ----------------------------------------------------------------------------------------------------------
# From the login node: jobs, logs, cancel
# ----------------------------------------------------------------------------------------------------------


def registry_entries(folder: str) -> list[dict]:
    path = Path(folder).resolve() / REGISTRY
    if not path.is_file():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        latest[entry["job_id"]] = entry  # a fresh cluster reuses ids: the newest submission wins
    return list(latest.values())


def accounting(job_id: str) -> list[dict]:
    """sacct's records of the job's allocation, one per run (a requeued job has several)."""
    out = run_slurm(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Start,End"])
    keys = ("job_id", "state", "exit_code", "start", "end")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


def job_summary(entry: dict) -> dict:
    """State, requeues, step reached and why it ended, for `knowlip jobs`."""
    records = accounting(entry["job_id"])
    state = records[-1]["state"].split()[0] if records else "UNKNOWN"
    requeues = sum(1 for r in records if r["state"].startswith("REQUEUED"))
    run_dir = Path(entry["run_dir"])
    step = None
    last = _last_line(run_dir / "metrics.jsonl")
    if last:
        step = json.loads(last).get("step")
    why = ""
    status = run_dir / STATUS_FILE
    if status.is_file():
        last = json.loads(status.read_text())[-1]
        why = last["message"] if last["job_id"] == entry["job_id"] else ""
    if state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL") and not why:
        why = _error_line(Path(entry["log_dir"]), entry["job_id"])
    mlflow_file = run_dir / "mlflow.json"  # written by the job's rank 0 (knowlip.track)
    mlflow_run = json.loads(mlflow_file.read_text())["run_id"] if mlflow_file.is_file() else None
    return {**{k: entry[k] for k in ("job_id", "job_name", "run_dir")}, "state": state, "requeues": requeues,
            "step": step, "mlflow_run": mlflow_run, "why": why}


def _last_line(path: Path, tail: int = 1 << 16) -> str:
    """The last line of a file without reading all of it (metrics.jsonl of a long run is large)."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - tail))
        lines = f.read().decode(errors="replace").splitlines()
    return lines[-1] if lines else ""


def _error_line(log_dir: Path, job_id: str) -> str:
    """The last line of the first failing rank's error log."""
    for err in sorted(log_dir.glob(f"{job_id}_*_log.err")):
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        if errors:
            return errors[-1].strip()[:200]
    return ""


def log_path(entry: dict, rank: int, stream: str = "out") -> Path:
    return Path(entry["log_dir"]) / f"{entry['job_id']}_{rank}_log.{stream}"


def follow(path: Path, job_done, poll_s: float = 1.0) -> None:
    """Print the file as it grows until job_done() (then what is left)."""
    position = 0
    while True:
        done = job_done()
        if path.is_file():
            with path.open(errors="replace") as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        if done:
            return
        time.sleep(poll_s)


def job_finished(job_id: str) -> bool:
    records = accounting(job_id)
    return bool(records) and records[-1]["state"].split()[0] not in ("PENDING", "RUNNING", "REQUEUED",
                                                                      "REQUEUE_HOLD", "SUSPENDED", "COMPLETING")


def wait_until_finished(job_id: str, timeout: float = 60) -> bool:
    """Poll sacct until the job is over (slurmdbd records an end a moment after it); False on timeout."""
    deadline = time.monotonic() + timeout
    while not job_finished(job_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def cancel(job_id: str) -> None:
    run_slurm(["scancel", job_id])
