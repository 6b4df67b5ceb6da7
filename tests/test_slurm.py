"""Slurm for real: a single-node cluster started from Debian's packages by cluster/local/up.sh (munge,
MariaDB + slurmdbd, slurmctld, slurmd), jobs submitted with `knowlip submit` through submitit, 2 tasks = 2 gloo
ranks of DeepSpeed ZeRO-3. Expected losses come from `knowlip train` run locally with the same seed and ranks.
Skipped where the packages are not installed (cluster/local/install.sh installs them; .ci/run does)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import HAVE_SLURM, REPO, assert_no_secret_in, job_id_of, losses, wait_for_steps
from knowlip.launch import slurm

CLI = [sys.executable, "-m", "knowlip.cli"]


# ----------------------------------------------------------------------------------------------------------
# Profiles and parsing: no cluster needed
# ----------------------------------------------------------------------------------------------------------


def test_profiles_load_and_nonsense_fails_with_the_key():
    local = slurm.load_profile("local")
    assert (local.tasks_per_node, local.gpus_per_node, local.partition) == (2, 0, "debug")
    h100 = slurm.load_profile("h100", ["cluster.nodes=4"])
    assert (h100.nodes, h100.gpus_per_node, h100.tasks_per_node, h100.exclusive) == (4, 8, 8, True)
    with pytest.raises(slurm.SlurmError, match="tasks_per_node=4 but gpus_per_node=8"):
        slurm.load_profile("h100", ["cluster.tasks_per_node=4"])
    with pytest.raises(slurm.SlurmError, match="signal_delay_s=3600 is not shorter"):
        slurm.load_profile("local", ["cluster.signal_delay_s=3600"])
    with pytest.raises(slurm.SlurmError, match="cpus_per_task=0"):
        slurm.load_profile("local", ["cluster.cpus_per_task=0"])
    with pytest.raises(slurm.SlurmError, match="gpus_per_nod"):
        slurm.load_profile("local", ["cluster.gpus_per_nod=1"])  # a typo names the key
    with pytest.raises(slurm.SlurmError, match="no cluster profile 'nope'.*known: .*local"):
        slurm.load_profile("nope")


def test_slurm_time_limits_parse_to_minutes():
    assert slurm._minutes("30:00") == 30
    assert slurm._minutes("1-02:03:00") == 1 * 1440 + 2 * 60 + 3
    assert slurm._minutes("00:10:30") == 11  # a started minute counts
    assert slurm._minutes("infinite") is None


def test_registry_keeps_the_newest_submission_of_a_reused_job_id(tmp_path):
    (tmp_path / slurm.REGISTRY).write_text(
        json.dumps({"job_id": "1", "run_dir": "old"}) + "\n" + json.dumps({"job_id": "2", "run_dir": "b"}) + "\n"
        + json.dumps({"job_id": "1", "run_dir": "new"}) + "\n")
    entries = {e["job_id"]: e["run_dir"] for e in slurm.registry_entries(str(tmp_path))}
    assert entries == {"1": "new", "2": "b"}


# ----------------------------------------------------------------------------------------------------------
# The real local cluster
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A fresh local cluster for this module (its own state folder and ports), stopped afterwards."""
    if not HAVE_SLURM:
        message = "Slurm/munge/MariaDB not installed: run cluster/local/install.sh (as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {message}")
        pytest.skip(message)
    # not under pytest's folder: that is private to root, and munged runs as the munge user
    state = Path(tempfile.mkdtemp(prefix="knowlip-slurm-", dir="/tmp"))
    state.chmod(0o755)
    env = {**os.environ, "KNOWLIP_SLURM_STATE": str(state), "KNOWLIP_SLURM_PORT": "17817"}
    up = subprocess.run(["bash", str(REPO / "cluster/local/up.sh")], env=env, capture_output=True, text=True,
                        timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(state / "etc" / "slurm.conf"))
    yield state
    patch.undo()
    subprocess.run(["bash", str(REPO / "cluster/local/down.sh"), "--purge"], env=env, capture_output=True,
                   timeout=120)


def knowlip(cwd: Path, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_submitted_job_trains_like_local_ranks(local_run, tiny_train_base, tmp_path):
    """Also: a secret given through the environment resolves on the node (the job reads storage.options) and is
    written nowhere: not in the submitit pickle, the Slurm logs or the run."""
    run = tmp_path / "run"
    secret = "knowlip-slurm-secret-5"
    proc = knowlip(tmp_path, "submit", "--cluster", "local", "--wait", f"run_dir={run}", *tiny_train_base,
                   "train.steps=16", "storage.options.secret=${oc.env:KNOWLIP_TEST_SECRET}",
                   env={"KNOWLIP_TEST_SECRET": secret})
    job = job_id_of(proc)
    assert f"job {job} finished" in proc.stdout
    assert losses(run) == losses(local_run)  # same seed, same 2 ranks: the same numbers, bit for bit
    rows = json.loads(knowlip(tmp_path, "jobs", "--json").stdout)
    row = next(r for r in rows if r["job_id"] == job)
    assert (row["state"], row["requeues"], row["step"]) == ("COMPLETED", 0, 16)
    log = knowlip(tmp_path, "logs", job, "--rank", "0").stdout
    assert "trained 16 steps" in log
    assert list((tmp_path / "runs" / "slurm").rglob("*.pkl"))  # the folder searched holds the job's pickles
    assert_no_secret_in(tmp_path, [secret], log, proc.stdout, proc.stderr)


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_usr2_saves_requeues_and_resumes_to_the_same_losses(local_run, tiny_train_base, tmp_path):
    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local", f"run_dir={run}", *tiny_train_base,
                            "train.steps=16", "data.num_workers=1"))
    deadline = wait_for_steps(run, 3)
    # what Slurm sends signal_delay_s before a time limit; to every task (the loader workers too)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    assert slurm.wait_until_finished(job, timeout=max(1.0, deadline - time.monotonic())), slurm.accounting(job)
    records = slurm.accounting(job)
    assert [r["state"].split()[0] for r in records] == ["REQUEUED", "COMPLETED"], records
    assert losses(run) == losses(local_run)  # saved, requeued, resumed: the uninterrupted run's numbers
    status = json.loads((run / slurm.STATUS_FILE).read_text())
    assert [s["event"] for s in status] == ["requeued"] and "SIGUSR2" in status[0]["message"]
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert checkpoints and checkpoints[0] < "step_00000016"  # the stop's own save, before the end
    rows = json.loads(knowlip(tmp_path, "jobs", "--json").stdout)
    assert next(r for r in rows if r["job_id"] == job)["requeues"] == 1


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_preemption_by_a_higher_priority_job_saves_requeues_once_and_resumes(local_run, tiny_train_base, tmp_path):
    """Slurm's own preemption (cluster/local/up.sh: PreemptType=preempt/partition_prio, PreemptMode=REQUEUE,
    GraceTime=60 on `debug`): a job on the `urgent` partition takes the whole node; ours gets SIGTERM, saves
    within the grace time, is requeued once, and resumes to the uninterrupted run's losses, each step once."""
    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local", f"run_dir={run}", *tiny_train_base,
                            "train.steps=16"))
    deadline = wait_for_steps(run, 3)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--exclusive", "-N1", "-o", str(tmp_path / "u.out"),
                             "--wrap", "echo urgent ran"], capture_output=True, text=True, check=True).stdout.strip()
    assert slurm.wait_until_finished(job, timeout=max(1.0, deadline - time.monotonic())), slurm.accounting(job)
    records = slurm.accounting(job)
    assert [r["state"].split()[0] for r in records] == ["REQUEUED", "COMPLETED"], records
    assert slurm.wait_until_finished(urgent, timeout=60)
    assert [r["state"].split()[0] for r in slurm.accounting(urgent)] == ["COMPLETED"]
    assert losses(run) == losses(local_run)  # every step once, the uninterrupted run's numbers
    status = json.loads((run / slurm.STATUS_FILE).read_text())
    assert [s["event"] for s in status] == ["requeued"] and "preempted" in status[0]["message"], status


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_a_failed_save_on_rank_0_ends_the_slurm_job_without_waiting_for_the_timeout(tiny_train_base, tmp_path):
    """ENOSPC in rank 0's save while rank 1 waits in a collective: `srun --kill-on-bad-exit` ends the step
    (without it: dist.timeout_s); the job is FAILED, not requeued, and the previous checkpoint is whole."""
    from knowlip.train.checkpoint import latest_complete, verify_checkpoint

    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local", f"run_dir={run}", *tiny_train_base,
                            "train.steps=4", "ckpt.every=2", env={"KNOWLIP_FAULT_ENOSPC_IN_SAVE": "4"}))
    partial = run / "checkpoints" / "step_00000004.partial"
    deadline = time.monotonic() + 300
    while not partial.exists():
        assert time.monotonic() < deadline and not slurm.job_finished(job), slurm.accounting(job)
        time.sleep(0.1)
    failed_at = time.monotonic()
    assert slurm.wait_until_finished(job, timeout=240), slurm.accounting(job)
    took = time.monotonic() - failed_at
    print(f"failure to job end under Slurm: {took:.1f} s")
    assert [r["state"].split()[0] for r in slurm.accounting(job)] == ["FAILED"]
    assert took < 60, took
    assert latest_complete(run / "checkpoints").name == "step_00000002"
    verify_checkpoint(run / "checkpoints" / "step_00000002")


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_impossible_requests_fail_at_submit_with_what_was_asked(tiny_train_base, tmp_path):
    proc = knowlip(tmp_path, "submit", "--cluster", "local", "cluster.cpus_per_task=64", *tiny_train_base)
    assert proc.returncode == 2
    assert "asks for 2 tasks x 64 CPUs per node; partition 'debug' offers" in proc.stderr, proc.stderr
    proc = knowlip(tmp_path, "submit", "--cluster", "local", "cluster.mem_gb=100000", *tiny_train_base)
    assert proc.returncode == 2 and "100000 GB per node" in proc.stderr, proc.stderr
    proc = knowlip(tmp_path, "submit", "--cluster", "local", "cluster.partition=gpu", *tiny_train_base)
    assert proc.returncode == 2 and "partition 'gpu' does not exist" in proc.stderr, proc.stderr
    proc = knowlip(tmp_path, "submit", "--cluster", "local", *tiny_train_base, "storage.options.secret=abc123")
    assert proc.returncode == 2 and "'storage.options.secret' holds a secret written out" in proc.stderr, proc.stderr
    assert "abc123" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "slurm" / slurm.REGISTRY).exists()  # nothing reached sbatch


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_requeue_limit_ends_the_job_failed_and_jobs_says_why(tiny_train_base, tmp_path):
    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local", "cluster.max_requeues=0", f"run_dir={run}",
                            *tiny_train_base, "train.steps=16"))
    deadline = wait_for_steps(run, 2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    assert slurm.wait_until_finished(job, timeout=max(1.0, deadline - time.monotonic())), slurm.accounting(job)
    assert [r["state"].split()[0] for r in slurm.accounting(job)] == ["FAILED"]
    assert list((run / "checkpoints").glob("step_*"))  # it saved before giving up
    row = next(r for r in json.loads(knowlip(tmp_path, "jobs", "--json").stdout) if r["job_id"] == job)
    assert row["state"] == "FAILED" and row["requeues"] == 0
    assert "not requeued" in row["why"] and "cluster.max_requeues=0" in row["why"]
    table = knowlip(tmp_path, "jobs").stdout
    assert job in table and "cluster.max_requeues=0" in table


@pytest.mark.integration
@pytest.mark.usefixtures("cluster")
def test_pack_as_a_slurm_array_equals_a_local_pack(tmp_path):
    from helpers import make_config
    from knowlip.sar.synth import synthesise_from_config

    synthesise_from_config(make_config(tmp_path, "synth.num_scenes=4", "synth.size=96"))
    common = [f"pack.inputs=[{tmp_path}/scenes]", "pack.chip.size=32", "pack.chip.stride=32",
              "pack.shard_max_samples=9"]
    local = knowlip(tmp_path, "pack", *common, f"pack.out_dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr
    array = knowlip(tmp_path, "pack", "--cluster", "local", "--array", "3", *common, f"pack.out_dir={tmp_path}/array")
    assert array.returncode == 0, array.stdout + array.stderr
    assert "(3 tasks), merged here" in array.stdout
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "array").iterdir())
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "array" / name).read_bytes(), name
