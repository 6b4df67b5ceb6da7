"""Shards on object storage, against a real S3-compatible server on loopback (moto's server mode, started here)
and, for failures, a real HTTP proxy in front of it that answers a share of the requests with 503 (or every
request with 403) as an overloaded or misconfigured store would. Nothing is mocked inside the client."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import assert_same_weights, free_port, make_config, straight_and_resumed
from knowlip.data.loader import StreamingLoader
from knowlip.data.shards import ShardError, load_index
from knowlip.data.storage import StorageError, StorageOptions, coalesce

BUCKET = "knowlip-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; the process environment points AWS clients at it."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not installed (it comes with the dev extra: moto[server])")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start (see {log.name})")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=endpoint)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)  # s3fs's mkdir fails against moto
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


class FaultyProxy:
    """Forwards HTTP to `target`; answers every `fail_every`-th request itself with `status` (an S3 error body)."""

    def __init__(self, target: str, fail_every: int, status: int = 503):
        host, port = target.removeprefix("http://").split(":")
        proxy = self
        self.requests = self.failed = 0
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.seen.append((self.command, self.path))
                    proxy.requests += 1
                    fail = proxy.requests % fail_every == 0
                    proxy.failed += fail
                if fail:
                    code = {503: "ServiceUnavailable", 403: "AccessDenied", 404: "NoSuchKey"}[status]
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def through(proxy: FaultyProxy, retries: int = 5) -> StorageOptions:
    return StorageOptions(options={"endpoint_url": proxy.url}, retries=retries, backoff_s=0.01)


def upload(folder: Path, endpoint: str) -> str:
    """A folder's files copied into a fresh prefix of the bucket, object by object; returns its URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    prefix = f"copies/{uuid.uuid4().hex[:8]}"
    for f in sorted(folder.iterdir()):
        client.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def s3_shards(s3_endpoint, synth_shards) -> str:
    """The session's synthetic shards in the bucket (read-only for tests)."""
    return upload(synth_shards, s3_endpoint)


def keys_by_step(loader: StreamingLoader, max_steps: int | None = None) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(list(batch["keys"]))
        if max_steps is not None and len(out) == max_steps:
            break
    return out


def test_coalesce_merges_neighbours_and_keeps_each_range_addressable():
    ranges = [(1000, 100), (0, 10), (10, 20), (5000, 10), (1150, 50)]
    requests, where = coalesce(ranges, max_gap=64)
    # by hand: [0, 30) touch, 1000-1100 and 1150-1200 are 50 apart (<= 64), 5000 stands alone
    assert requests == [(0, 30), (1000, 200), (5000, 10)]
    assert where == [(1, 0), (0, 0), (0, 10), (2, 0), (1, 150)]
    assert coalesce(ranges, max_gap=0)[0] == [(0, 30), (1000, 100), (1150, 50), (5000, 10)]


def test_pack_to_s3_equals_a_local_pack_byte_for_byte(s3_endpoint, tmp_path):
    import boto3

    local = make_config(tmp_path, "synth.num_scenes=3", "synth.size=64", "pack.chip.size=32", "pack.chip.stride=32",
                        "pack.shard_max_samples=5")
    from knowlip.data.pack import pack
    from knowlip.sar.synth import synthesise_from_config

    synthesise_from_config(local)
    pack(local)
    url = f"s3://{BUCKET}/packed-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, "-m", "knowlip.cli", "pack", f"{tmp_path}/scenes", "--out", url,
                           "pack.chip.size=32", "pack.chip.stride=32", "pack.shard_max_samples=5"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and f"into {url}" in proc.stdout, proc.stdout + proc.stderr
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = url.split(f"{BUCKET}/")[1]
    objects = {o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    files = {f.name for f in (tmp_path / "shards").iterdir()}
    assert objects == files and "index.json" in objects and len(objects) >= 5
    for name in files:
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()
        assert body == (tmp_path / "shards" / name).read_bytes(), name


def test_loader_from_s3_gives_the_local_batches_and_resumes_exactly(s3_shards, synth_shards):
    local = keys_by_step(StreamingLoader(synth_shards, 8, num_workers=2, shuffle_block=16))
    remote_loader = StreamingLoader(s3_shards, 8, num_workers=2, shuffle_block=16)
    assert keys_by_step(remote_loader) == local
    # a state saved while reading from disk, resumed from the bucket (and the other way round)
    first = StreamingLoader(synth_shards, 8, shuffle_block=16)
    head = keys_by_step(first, max_steps=3)
    resumed = StreamingLoader(s3_shards, 8, num_workers=2, shuffle_block=16)
    resumed.load_state_dict(first.state_dict())
    assert head + keys_by_step(resumed) == local
    back = StreamingLoader(synth_shards, 8, shuffle_block=16)
    back.load_state_dict(resumed.state_dict())  # saved at the end of epoch 0, read from the bucket
    assert back.epoch == 1 and keys_by_step(back) == keys_by_step(resumed)  # epoch 1: disk == bucket


def test_train_tiny_from_s3_and_resume_equals_training_from_disk(s3_shards, synth_shards, tiny_in_process_base,
                                                                 tmp_path):
    """Run a trains straight from disk; run b from S3, stopped at step 3 and resumed."""
    from knowlip.train.trainer import Trainer

    def trainer_in(run: str) -> Trainer:
        shards = synth_shards if run == "a" else s3_shards
        return Trainer(make_config(tmp_path / run, *tiny_in_process_base, f"data.shards={shards}", "train.steps=8",
                                   "train.log_every=100"))

    disk, resumed = straight_and_resumed(trainer_in, stop_at=3)
    assert_same_weights(disk.model, resumed.model)


def test_a_flaky_server_is_retried_without_losing_or_repeating_a_sample(s3_endpoint, s3_shards, synth_shards):
    proxy = FaultyProxy(s3_endpoint, fail_every=4)
    try:
        expected = keys_by_step(StreamingLoader(synth_shards, 8, shuffle_block=16, drop_last=False))
        index = load_index(s3_shards, through(proxy))
        loader = StreamingLoader(index, 8, shuffle_block=16, drop_last=False)
        got = keys_by_step(loader)
        assert got == expected
        assert proxy.failed > 0 and index.store.stats.retries >= proxy.failed
        assert sum(len(k) for k in got) == index.total_samples == len({k for ks in got for k in ks})
    finally:
        proxy.close()


def test_retries_are_bounded_and_the_error_names_the_url(s3_endpoint, s3_shards):
    proxy = FaultyProxy(s3_endpoint, fail_every=1)  # every request fails
    try:
        with pytest.raises(ShardError, match=rf"{s3_shards}/index.json: .*after 2 retries"):
            load_index(s3_shards, through(proxy, retries=2))
        assert proxy.requests == 3
    finally:
        proxy.close()


def test_missing_objects_and_denied_access_fail_at_once_naming_the_url(s3_endpoint, s3_shards):
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/nowhere/index.json: no shard index .*no such object"):
        load_index(f"s3://{BUCKET}/nowhere")
    denied = FaultyProxy(s3_endpoint, fail_every=1, status=403)
    try:
        with pytest.raises(ShardError, match=rf"{s3_shards}/index.json: .*access denied"):
            load_index(s3_shards, through(denied))
        assert denied.requests == 1  # not retried
    finally:
        denied.close()
    missing = FaultyProxy(s3_endpoint, fail_every=1, status=404)
    try:
        with pytest.raises(ShardError, match=rf"{s3_shards}/index.json: no shard index .*no such object"):
            load_index(s3_shards, through(missing))
        # a 404 is final: no request is repeated (s3fs follows its HEAD with one listing, to tell a missing object
        # from a folder; a retry would send the same HEAD again, after a backoff)
        assert len(missing.seen) == len(set(missing.seen)) and missing.requests <= 2, missing.seen
    finally:
        missing.close()

def test_a_shard_missing_from_the_bucket_is_named(s3_endpoint, synth_shards):
    import boto3

    url = upload(synth_shards, s3_endpoint)
    index = load_index(url)
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(
        Bucket=BUCKET, Key=f"{url.split(BUCKET + '/')[1]}/{index.names[1]}")
    with pytest.raises(ShardError, match=rf"{url}/{index.names[1]}: shard listed in .* is missing"):
        load_index(url)
    with pytest.raises(StorageError, match=rf"{url}/{index.names[1]}: no such object"):  # a loader mid-epoch
        index.read_samples([(1, 0)])


def test_verify_and_inspect_read_shards_from_the_bucket(s3_endpoint, synth_shards, tmp_path):
    """`knowlip data verify` and `data inspect` on a URL; damage planted in one object is named."""
    import boto3

    url = upload(synth_shards, s3_endpoint)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "knowlip.cli", "data", *a], capture_output=True, text=True,
                                    timeout=300)
    ok = cli("verify", url)
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("OK"), ok.stdout + ok.stderr
    inspected = cli("inspect", url, "--json")
    assert inspected.returncode == 0 and '"samples": 96' in inspected.stdout, inspected.stderr
    index = load_index(url)
    name = index.names[2]
    offset, length = index.table(2).sample_range(1)
    raw = bytearray((synth_shards / name).read_bytes())
    raw[offset + length - 600] ^= 0xFF  # a byte near the end of sample 1 (its json/txt payloads)
    key = f"{url.split(BUCKET + '/')[1]}/{name}"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=BUCKET, Key=key, Body=bytes(raw))
    bad = cli("verify", url)
    assert bad.returncode == 1 and f"damaged: {name} sample 1" in bad.stdout and f"{name}: sha256 differs" in bad.stdout, \
        bad.stdout + bad.stderr
