"""The local cluster exactly as the README starts it, in a user's environment (no KNOWLIP_SLURM_* or SLURM_*
variables: default state folder and ports): `bash cluster/local/up.sh`, `make quickstart-slurm`,
`bash cluster/local/down.sh`. Every other Slurm test sets KNOWLIP_SLURM_STATE, which once hid an up.sh that
exited 1 without a word whenever it was run as documented."""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import HAVE_SLURM, REPO

DEFAULT_STATE = Path("/tmp/knowlip-slurm")

pytestmark = pytest.mark.skipif(not HAVE_SLURM and os.environ.get("CI") != "true",
                                reason="Slurm/munge/MariaDB not installed: run cluster/local/install.sh (as root)")


def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KNOWLIP_SLURM", "SLURM_"))}


def run(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=timeout)


def test_up_sh_refuses_a_state_folder_others_can_write():
    state = Path(tempfile.mkdtemp(prefix="knowlip-slurm-open-", dir="/tmp"))
    try:
        state.chmod(0o777)  # as any local user could have prepared it, munge key included
        proc = subprocess.run(["bash", str(REPO / "cluster/local/up.sh")], capture_output=True, text=True,
                              env={**user_env(), "KNOWLIP_SLURM_STATE": str(state)}, timeout=60)
        assert proc.returncode == 2 and f"up.sh: {state} belongs to uid" in proc.stderr, proc.stdout + proc.stderr
        assert list(state.iterdir()) == []  # nothing started, nothing written
    finally:
        shutil.rmtree(state)


def test_up_sh_and_make_quickstart_slurm_as_the_readme_writes_them():
    assert HAVE_SLURM, "CI must run the Slurm tests: run cluster/local/install.sh (as root)"
    try:
        up = run("bash", "cluster/local/up.sh")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export SLURM_CONF={DEFAULT_STATE}/etc/slurm.conf" in up.stdout
        # the generated database password, private, and not the constant of old
        password = (DEFAULT_STATE / "etc/db.pass").read_text().strip()
        assert len(password) == 64 and (DEFAULT_STATE / "etc/db.pass").stat().st_mode & 0o077 == 0
        dbd = (DEFAULT_STATE / "etc/slurmdbd.conf").read_text()
        assert f"StoragePass={password}" in dbd and "StoragePass=knowlip" not in dbd
        # stopped and started again: munged gets a new key, never the one lying in the folder
        key = hashlib.sha256((DEFAULT_STATE / "munge-key/munge.key").read_bytes()).hexdigest()
        assert run("bash", "cluster/local/down.sh").returncode == 0
        again = run("bash", "cluster/local/up.sh")
        assert again.returncode == 0, again.stdout + again.stderr
        assert hashlib.sha256((DEFAULT_STATE / "munge-key/munge.key").read_bytes()).hexdigest() != key

        quick = run("make", "quickstart-slurm", timeout=900)
        assert quick.returncode == 0, quick.stdout[-3000:] + quick.stderr[-3000:]
        rows = [json.loads(line) for line in (REPO / "runs/quickstart/metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 40 and (REPO / "runs/quickstart/model.safetensors").is_file()
    finally:
        down = run("bash", "cluster/local/down.sh", "--purge", timeout=120)
    assert down.returncode == 0 and not DEFAULT_STATE.exists(), down.stdout + down.stderr
