"""Two hosts on one machine: a real two-node Slurm cluster (cluster/local/up.sh --nodes 2: two network
namespaces joined by a veth pair, one slurmd in each with its own host name, the control plane in the first),
jobs of one rank per host talking gloo across the veth. Expected losses come from `knowlip train` with 2 local
ranks on one host and the same seed. Nothing is mocked; where network namespaces cannot be made (a sandbox
without CAP_NET_ADMIN) the module skips with the reason `ip netns add` gave."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import HAVE_SLURM, REPO, deepspeed_zero_stage, job_id_of, losses, wait_for_steps

NS1 = "/var/run/netns/knowlip-node1"
pytestmark = pytest.mark.integration


def in_node1(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command in node1's namespace, where slurmctld and slurmdbd are reachable (as a login node would be)."""
    return subprocess.run(["nsenter", f"--net={NS1}", *args], capture_output=True, text=True, timeout=timeout)


def knowlip(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={NS1}", sys.executable, "-m", "knowlip.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def namespaces_refused() -> str | None:
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found: the two-host cluster needs iproute2 and util-linux"
    probe = subprocess.run(["ip", "netns", "add", "knowlip-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces refused here: `ip netns add` said: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "knowlip-probe"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def two_hosts(tiny_train_base):
    if not HAVE_SLURM:
        pytest.skip("Slurm/munge/MariaDB not installed: run cluster/local/install.sh (as root)")
    reason = namespaces_refused()
    if reason:
        pytest.skip(reason)
    if Path(NS1).exists():
        pytest.fail(f"{NS1} exists: another two-host cluster is up (cluster/local/down.sh --nodes 2)")
    state = Path(tempfile.mkdtemp(prefix="knowlip-slurm2-", dir="/tmp"))
    state.chmod(0o755)
    env = {**os.environ, "KNOWLIP_SLURM_STATE": str(state), "KNOWLIP_SLURM_PORT": "19817"}
    up = subprocess.run(["bash", str(REPO / "cluster/local/up.sh"), "--nodes", "2"], env=env, capture_output=True,
                        text=True, timeout=240)
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(state / "etc" / "slurm.conf"))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield [f"cluster.environment.SLURM_CONF={state}/etc/slurm.conf"]
    finally:
        patch.undo()
        down = subprocess.run(["bash", str(REPO / "cluster/local/down.sh"), "--nodes", "2", "--purge"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert not Path(NS1).exists() and "knowlip-local2" not in Path("/etc/hosts").read_text(), down.stdout


def states(job: str) -> list[str]:
    out = in_node1("sacct", "-j", job, "-D", "-X", "-n", "-P", "-o", "State", timeout=60).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_finished(job: str, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = states(job)
        if found and found[-1] in ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"):
            return found
        assert time.monotonic() < deadline, f"job {job} did not finish: {found}"
        time.sleep(0.5)


def rank_hosts(log_dir: Path, job: str) -> list[str]:
    """Each rank's host name, as submitit's log of that task states it."""
    hosts = []
    for rank in (0, 1):
        text = next(log_dir.glob(f"**/{job}_{rank}_log.out")).read_text()
        hosts.append(text.split("hostname=")[1].split(",")[0])
    return hosts


def test_two_host_job_trains_like_two_ranks_on_one_host(two_hosts, local_run, tiny_train_base, tmp_path):
    run = tmp_path / "run"
    proc = knowlip(tmp_path, "submit", "--cluster", "local2", "--wait", *two_hosts, f"run_dir={run}",
                   *tiny_train_base, "train.steps=16", "mlflow.enabled=true", "mlflow.system_interval_s=1")
    job = job_id_of(proc)
    assert f"job {job} finished" in proc.stdout, proc.stdout[-2000:]
    assert rank_hosts(tmp_path / "runs" / "slurm", job) == ["node1", "node2"]  # one rank on each host
    assert losses(run) == losses(local_run)  # gloo across the veth: the one-host numbers, bit for bit
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    keys = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.metrics
    # the default sqlite store is one file: only rank 0's host writes to it, and submit said so
    assert any(k.startswith("system/node1/") for k in keys), sorted(keys)[:20]
    assert not any(k.startswith("system/node2/") for k in keys), sorted(keys)[:20]
    assert "only rank 0's node writes to it" in proc.stdout and "mlflow.tracking_uri=http://" in proc.stdout


def test_usr2_requeues_and_resumes_across_both_hosts(two_hosts, local_run, tiny_train_base, tmp_path):
    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local2", *two_hosts, f"run_dir={run}",
                            *tiny_train_base, "train.steps=16"))
    wait_for_steps(run, 3)
    assert in_node1("scancel", "--signal=USR2", job, timeout=60).returncode == 0
    assert wait_finished(job) == ["REQUEUED", "COMPLETED"]
    assert losses(run) == losses(local_run)  # saved on two hosts, requeued, resumed: the same numbers


def test_zero2_across_two_hosts_requeues_and_trains_like_zero3(two_hosts, local_run, tiny_train_base, tmp_path):
    """ZeRO-2, the stage bench/scaling_model.py recommends across hosts for `base`: gradients reduce-scattered
    over the veth, saved on both hosts at USR2, resumed after the requeue; the ZeRO-3 losses of one host."""
    run = tmp_path / "run"
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local2", *two_hosts, f"run_dir={run}",
                            *tiny_train_base, "train.steps=16", "train.zero_stage=2"))
    wait_for_steps(run, 3)
    assert in_node1("scancel", "--signal=USR2", job, timeout=60).returncode == 0
    assert wait_finished(job) == ["REQUEUED", "COMPLETED"]
    assert rank_hosts(tmp_path / "runs" / "slurm", job) == ["node1", "node2"]
    assert deepspeed_zero_stage(run / "checkpoints/step_00000016") == 2
    assert losses(run) == pytest.approx(losses(local_run), rel=1e-5)


def test_a_checkpoint_written_by_two_hosts_resumes_on_one(two_hosts, local_run, tiny_train_base, tmp_path):
    run = tmp_path / "run"
    proc = knowlip(tmp_path, "submit", "--cluster", "local2", "--wait", *two_hosts, f"run_dir={run}",
                   *tiny_train_base, "train.steps=16", "train.stop_at=8")
    job_id_of(proc)
    assert max(losses(run)) == 8
    local = subprocess.run([sys.executable, "-m", "knowlip.cli", "train", f"run_dir={run}", "dist.nproc_per_node=2",
                            *tiny_train_base, "train.steps=16"], capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    assert losses(run) == losses(local_run)


def task_pid(job: str, rank: int) -> int | None:
    """The pid of a job's rank (its submitit task), found by its Slurm environment."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in e)
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank) and b"submitit" in cmd:
            return int(proc.name)
    return None


def test_a_host_dying_mid_run_ends_the_job_and_the_next_run_resumes_from_the_last_checkpoint(
        two_hosts, local_run, tiny_train_base, tmp_path):
    run = tmp_path / "run"
    slow = ["cluster.environment.KNOWLIP_FAULT_SLOW_STEPS=1-16", "ckpt.every=4"]  # 0.5 s steps: time to kill
    job = job_id_of(knowlip(tmp_path, "submit", "--cluster", "local2", *two_hosts, *slow, f"run_dir={run}",
                            *tiny_train_base, "train.steps=16"))
    wait_for_steps(run, 6)
    pid = task_pid(job, rank=1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, 9)  # node2's rank dies as its host would: no signal handler, no checkpoint
    ended = wait_finished(job)
    assert ended[-1] == "FAILED", ended  # rank 0 sees its peer gone and fails too; nothing hangs
    died_at = max(losses(run))
    assert died_at < 16
    again = knowlip(tmp_path, "submit", "--cluster", "local2", "--wait", *two_hosts, f"run_dir={run}",
                    *tiny_train_base, "train.steps=16", "ckpt.every=4")
    job_id_of(again)
    resumed = [line for p in (tmp_path / "runs" / "slurm").glob("**/*_0_log.err") for line in p.read_text().splitlines()
               if "resumed from" in line and f"step_{died_at // 4 * 4:08d}" in line]
    assert resumed, "the second run did not resume from the last complete checkpoint"
    assert losses(run) == losses(local_run)  # the steps since that checkpoint were redone, the same numbers
