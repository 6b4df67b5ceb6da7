"""Where shards live: a local folder, or an object store named by an fsspec URL (e.g. `s3://bucket/prefix`).

A store offers the little the data layer needs: read an object, read byte ranges of objects (the loader's
samples; neighbouring ranges coalesced into one request, several requests in flight), and, for packing, write,
upload, list and remove. Object-store calls retry transient failures (5xx answers, timeouts, dropped
connections) with exponential backoff; a missing object or denied access fails at once, naming the URL.

Endpoint and credentials come from `storage.options` (passed to fsspec, e.g. endpoint_url, key, secret) or from
the environment as for any AWS client (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from knowlip.config import StorageConfig

Range = tuple[int, int]  # (offset, length) in bytes
OPEN_FILES = 256  # shard files a local reader keeps open


class StorageError(OSError):
    """A storage failure that is not worth retrying, or that outlived its retries; the message names the URL.
    Not a damaged sample: the loader lets it stop the run rather than skip data it could not reach."""


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


# Object stores a config may name without saying so explicitly (storage.extra_protocols adds to them).
ALLOWED_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def check_protocol(root: str, options: "StorageOptions") -> None:
    protocol = str(root).split("://", 1)[0].lower()
    allowed = (*ALLOWED_PROTOCOLS, *options.extra_protocols)
    if protocol not in allowed:
        raise StorageError(f"{root}: the {protocol!r} protocol is not allowed (allowed: {', '.join(allowed)}); "
                           f"name it in storage.extra_protocols if this job should use it")


# How to reach an object store: the `storage` config section's dataclass, so its defaults live in one place.
StorageOptions = StorageConfig


def storage_options(section) -> StorageOptions:
    """A `storage` config section as StorageOptions."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(section)


@dataclass
class StoreStats:
    requests: int = 0
    retries: int = 0


def coalesce(ranges: Sequence[Range], max_gap: int) -> tuple[list[Range], list[tuple[int, int]]]:
    """Merge ranges whose gap is at most `max_gap` into requests. Returns (requests, where): range k is
    bytes [where[k][1], where[k][1] + length) of request where[k][0]."""
    order = sorted(range(len(ranges)), key=lambda k: ranges[k][0])
    requests: list[list[int]] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(ranges)
    for k in order:
        offset, length = ranges[k]
        if requests and offset - (requests[-1][0] + requests[-1][1]) <= max_gap and offset >= requests[-1][0]:
            start = requests[-1][0]
            requests[-1][1] = max(requests[-1][1], offset + length - start)
        else:
            requests.append([offset, length])
        where[k] = (len(requests) - 1, offset - requests[-1][0])
    return [(a, b) for a, b in requests], where


class LocalStore:
    """A folder on a POSIX file system: positioned reads of files kept open, atomic writes."""

    remote = False

    def __init__(self, root: str | Path, options: StorageOptions | None = None):
        self.root = Path(root)
        self.stats = StoreStats()
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def url(self, name: str) -> str:
        return str(self.root / name)

    def path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url(name)}: no such file") from exc

    def read_ranges(self, requests: Sequence[tuple[str, Range]]) -> list[bytes]:
        """Bytes of each (name, (offset, length)); a short read returns fewer bytes (the caller checks)."""
        out = []
        for name, (offset, length) in requests:
            out.append(os.pread(self._open(name).fileno(), length, offset))
            self.stats.requests += 1
        return out

    def _open(self, name: str):
        """The shard's file, kept open (at most OPEN_FILES per process, least recently used closed first: an
        epoch over 100k shards must not run out of descriptors)."""
        if os.getpid() != self._pid:  # a forked loader worker: its own descriptors
            self._files, self._pid = OrderedDict(), os.getpid()
        if name in self._files:
            self._files.move_to_end(name)
        else:
            self._files[name] = open(self.root / name, "rb")
            if len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        return self._files[name]

    def sizes(self, names: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """(size, readable by this process) of these files, missing ones left out: one stat each, readability
        from the mode bits (100k shards are checked in about 0.3 s)."""
        root, out = str(self.root), {}
        uid, groups = os.geteuid(), set(os.getgroups()) | {os.getegid()}
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            out[name] = (st.st_size, _readable(st, uid, groups))
        return out

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)

    def upload(self, name: str, local: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(local, self.root / name)

    def list(self, prefix: str = "") -> list[str]:
        """Names in the folder starting with `prefix` (one directory pass, no stat)."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if e.name.startswith(prefix) and not e.is_dir())
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _readable(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _transient(exc: BaseException) -> bool:
    """Worth another try: timeouts, dropped connections, 5xx / throttling (s3fs turns those into OSError)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3")


class ObjectStore:
    """An fsspec filesystem under a URL prefix, with knowlip's retry policy (the client's own is turned down
    to one attempt, so that retries are counted and bounded here)."""

    remote = True

    def __init__(self, root: str, options: StorageOptions | None = None):
        import fsspec

        self.root = root.rstrip("/")
        self.opts = options or StorageOptions()
        self.protocol, self.base = fsspec.core.split_protocol(self.root)
        self.stats = StoreStats()
        self._fs, self._pid = None, None

    @property
    def fs(self):
        """The filesystem, made per process (a forked loader worker must not share the parent's event loop)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            kwargs = dict(self.opts.options)
            if self.protocol in ("s3", "s3a"):
                config = dict(kwargs.pop("config_kwargs", {}) or {})
                config.setdefault("retries", {"total_max_attempts": 1})
                kwargs["config_kwargs"] = config
            self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **kwargs)
            if hasattr(self._fs, "retries"):
                self._fs.retries = 1
            self._pid = os.getpid()
        return self._fs

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.base}/{name}"

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() with retries on transient failures; clear errors for missing objects and denied access."""
        for attempt in range(self.opts.retries + 1):
            try:
                self.stats.requests += 1
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by _transient
                if not _transient(exc) or attempt == self.opts.retries:
                    raise self._error(exc, what, attempt) from exc
                self.stats.retries += 1
                time.sleep(self._wait(attempt))
        raise AssertionError("unreachable")

    @staticmethod
    def _error(exc: BaseException, what: str, attempt: int) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{what}: no such object (or bucket)")
        if isinstance(exc, PermissionError):
            return StorageError(f"{what}: access denied ({exc}); check the credentials (storage.options or "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        return StorageError(f"{what}: {type(exc).__name__}: {exc}" + (f" (after {attempt} retries)" if attempt else ""))

    def _wait(self, attempt: int) -> float:
        return min(10.0, self.opts.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def read(self, name: str) -> bytes:
        return self._call(lambda: self.fs.cat_file(self._key(name)), self.url(name))

    def read_ranges(self, requests: Sequence[tuple[str, Range]]) -> list[bytes]:
        """Bytes of each (name, (offset, length)): ranges of one object within `coalesce_gap_bytes` of each
        other become one request, up to `requests_in_flight` requests run at once, and the failed ones of a
        round are retried (with backoff) until each succeeds or is out of retries."""
        by_name: dict[str, list[int]] = {}
        for k, (name, _) in enumerate(requests):
            by_name.setdefault(name, []).append(k)
        calls: list[tuple[str, Range]] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(requests)
        for name, ks in by_name.items():
            merged, local = coalesce([requests[k][1] for k in ks], self.opts.coalesce_gap_bytes)
            for k, (call, inside) in zip(ks, local):
                where[k] = (len(calls) + call, inside)
            calls += [(name, r) for r in merged]
        results = self._fetch(calls)
        return [results[c][inside : inside + requests[k][1][1]] for k, (c, inside) in enumerate(where)]

    def _fetch(self, calls: list[tuple[str, Range]]) -> list[bytes]:
        results: list[bytes | None] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(self.opts.retries + 1):
            keys = [self._key(calls[i][0]) for i in pending]
            starts = [calls[i][1][0] for i in pending]
            ends = [calls[i][1][0] + calls[i][1][1] for i in pending]
            got = self._call(lambda: self.fs.cat_ranges(keys, starts, ends, on_error="return",
                                                        batch_size=self.opts.requests_in_flight),
                             self.url(calls[pending[0]][0]))
            self.stats.requests += len(pending) - 1  # _call counted one
            failed = []
            for i, data in zip(pending, got):
                if isinstance(data, BaseException):
                    if not _transient(data) or attempt == self.opts.retries:
                        raise self._error(data, self.url(calls[i][0]), attempt) from data
                    failed.append(i)
                else:
                    results[i] = data
            if not failed:
                return results  # type: ignore[return-value]
            self.stats.retries += len(failed)
            time.sleep(self._wait(attempt))
            pending = failed
        raise AssertionError("unreachable")

    def sizes(self, names: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """(size, True) of the objects under the prefix that are among `names`: one listing, not a request
        each (readability shows at the first read: the listing cannot tell)."""
        listing = self._call(lambda: self.fs.ls(self.base, detail=True, refresh=True), self.root + "/")
        wanted = set(names)
        return {e["name"].rsplit("/", 1)[-1]: (int(e["size"]), True) for e in listing
                if e.get("type") != "directory" and e["name"].rsplit("/", 1)[-1] in wanted}

    def write(self, name: str, data: bytes) -> None:
        self._call(lambda: self.fs.pipe_file(self._key(name), data), self.url(name))

    def upload(self, name: str, local: Path) -> None:
        self._call(lambda: self.fs.put_file(str(local), self._key(name)), self.url(name))
        local.unlink()

    def list(self, prefix: str = "") -> list[str]:
        try:
            listing = self._call(lambda: self.fs.ls(self.base, detail=False, refresh=True), self.root + "/")
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):  # nothing under the prefix yet
                return []
            raise
        names = [n.rsplit("/", 1)[-1] for n in listing]
        return sorted(n for n in names if n.startswith(prefix))

    def remove(self, name: str) -> None:
        self._call(lambda: self.fs.rm_file(self._key(name)), self.url(name))

    def close(self) -> None:
        pass


def open_store(root: str | Path, options: StorageOptions | None = None) -> LocalStore | ObjectStore:
    if not is_url(root):
        return LocalStore(root, options)
    options = options or StorageOptions()
    check_protocol(str(root), options)
    return ObjectStore(str(root), options)
