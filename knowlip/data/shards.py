"""WebDataset tar shards: the format between `knowlip pack` and the streaming loader.

A sample is three tar members sharing a key: `KEY.chip.npy` (raw chip, native dtype, (C, H, W)),
`KEY.txt` (caption) and `KEY.json` (metadata: georeference, product, keyword spans of the caption).
Shards are plain POSIX tar files written deterministically (fixed mtime/owner, sorted inputs), so the same
inputs give byte-identical shards, and `tar tf` or any webdataset reader lists them. They live in a folder or
under an object-store prefix (knowlip.data.storage).

`index.json` (format version 2) holds per-shard facts only, as columns (names, sample counts, sizes, end
offsets, sha256), so it grows with the shard count, not the sample count. Each shard's per-sample facts (the
byte offset of every sample, the XXH3-64 of each member) sit beside it in `shard-NNNNNN.idx.npy`, read when a
reader first needs that shard: any sample is one positioned read away (O(1) resume). Version-1 indexes, which
listed every offset and checksum inside index.json, still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import xxhash

from knowlip.data.storage import LocalStore, ObjectStore, StorageError, StorageOptions, open_store

INDEX_NAME = "index.json"
FORMAT_VERSION = 2
CHIP_EXT, CAPTION_EXT, META_EXT = "chip.npy", "txt", "json"
MEMBERS = (CHIP_EXT, CAPTION_EXT, META_EXT)
# Per-member checksums: xxHash's XXH3-64 (python-xxhash, maintained, wheels everywhere). Not cryptographic (the
# shard's sha256 is), but ~10x the speed of zlib's CRC32 and well past memory bandwidth, so the loader can
# verify every sample it reads for well under 1% of its time.
CHECKSUM = "xxh3_64"
# One row per sample of a shard: where it starts, each member's checksum, which members it has (bit k: MEMBERS[k]).
SAMPLE_TABLE = np.dtype([("offset", "<u8"), ("checksum", "<u8", (len(MEMBERS),)), ("members", "u1")])
TABLES_CACHED = 64  # sample tables a reader keeps (an LRU): memory stays bounded however many shards an epoch visits


class ShardError(ValueError):
    """A shard or index that cannot be used; the message names the file."""


class CorruptSample(ShardError):
    """A sample whose bytes do not match the checksums recorded when it was packed."""


def member_checksums(members: dict[str, bytes]) -> tuple[list[int], int]:
    """(XXH3-64 of each member in MEMBERS order, 0 where missing; bit mask of the members present)."""
    sums = [xxhash.xxh3_64_intdigest(members[ext]) if ext in members else 0 for ext in MEMBERS]
    return sums, sum(1 << k for k, ext in enumerate(MEMBERS) if ext in members)


def table_name(shard_name: str) -> str:
    """The sample table beside a shard: shard-000003.tar -> shard-000003.idx.npy."""
    return shard_name.removesuffix(".tar") + ".idx.npy"


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    end: int  # byte offset just past the last sample (start of the tar end-of-archive blocks)
    sha256: str = ""


class SampleTable:
    """One shard's per-sample facts: offsets and member checksums (None: an old index without checksums)."""

    def __init__(self, shard: ShardInfo, offsets: np.ndarray, checksums: Optional[np.ndarray],
                 members: Optional[np.ndarray]):
        if len(offsets) != shard.samples:
            raise ShardError(f"{shard.name}: sample table has {len(offsets)} rows for {shard.samples} samples")
        self.shard, self.offsets, self.checksums, self.members = shard, offsets, checksums, members

    @classmethod
    def from_npy(cls, shard: ShardInfo, raw: bytes) -> "SampleTable":
        try:
            rows = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise ShardError(f"{table_name(shard.name)}: not a sample table ({exc})") from exc
        if rows.dtype != SAMPLE_TABLE:
            raise ShardError(f"{table_name(shard.name)}: sample table of dtype {rows.dtype}, expected {SAMPLE_TABLE}")
        return cls(shard, rows["offset"], rows["checksum"], rows["members"])

    @classmethod
    def from_v1(cls, shard: ShardInfo, entry: dict) -> "SampleTable":
        """A version-1 index entry: offsets and hex checksums ('' = member missing) inside index.json."""
        offsets = np.asarray(entry["offsets"], dtype=np.uint64)
        hexes = entry.get("checksums")
        if not hexes:
            return cls(shard, offsets, None, None)
        sums = np.array([[int(h, 16) if h else 0 for h in row] for row in hexes], dtype=np.uint64)
        present = np.array([sum(1 << k for k, h in enumerate(row) if h) for row in hexes], dtype=np.uint8)
        return cls(shard, offsets, sums.reshape(len(hexes), len(MEMBERS)), present)

    def sample_range(self, i: int) -> tuple[int, int]:
        """(offset, length) in bytes of sample i's members."""
        start = int(self.offsets[i])
        stop = int(self.offsets[i + 1]) if i + 1 < self.shard.samples else self.shard.end
        return start, stop - start

    def checked(self, i: int, raw: bytes) -> dict[str, bytes] | ShardError:
        """Sample i's members from its bytes (as read at sample_range(i)), checked against its checksums; a
        damaged sample comes back as its ShardError (CorruptSample for a checksum mismatch)."""
        try:
            if len(raw) != self.sample_range(i)[1]:
                raise ShardError(f"{self.shard.name}: truncated at sample {i}")
            members = parse_members(raw)
            self.verify(i, members)
            return members
        except ShardError as exc:
            return exc
        except (tarfile.TarError, ValueError, UnicodeDecodeError) as exc:
            return ShardError(f"{self.shard.name} sample {i}: unreadable ({type(exc).__name__}: {exc})")

    def verify(self, i: int, members: dict[str, bytes]) -> None:
        """Raise CorruptSample, naming the shard, sample and member, when bytes differ from those packed."""
        if self.checksums is None:
            return  # an index written before checksums: nothing to compare with
        sums, present = member_checksums(members)
        for k, ext in enumerate(MEMBERS):
            if sums[k] != int(self.checksums[i, k]) or (present ^ int(self.members[i])) & (1 << k):
                key = members.get("__key__", b"?").decode(errors="replace")
                raise CorruptSample(f"{self.shard.name} sample {i} ({key}): {ext} bytes differ from the checksum "
                                    "recorded at packing (damaged shard)")


class ShardIndex:
    """The shards of a folder or prefix: per-shard facts as columns, sample tables read on demand (an LRU)."""

    def __init__(self, root: str, store: LocalStore | ObjectStore, names: list[str], samples: np.ndarray,
                 sizes: np.ndarray, ends: np.ndarray, sha256: list[str], info: dict,
                 v1_entries: Optional[list[dict]] = None):
        self.root, self.store, self.info = root, store, info
        self.names, self.samples, self.sizes, self.ends, self.sha256 = names, samples, sizes, ends, sha256
        self.version = 1 if v1_entries is not None else FORMAT_VERSION
        self.has_checksums = v1_entries is None or all(e.get("checksums") for e in v1_entries)
        self._v1 = v1_entries
        self._tables: OrderedDict[int, SampleTable] = OrderedDict()
        self._fingerprint: Optional[str] = None

    @property
    def num_shards(self) -> int:
        return len(self.names)

    @property
    def shards(self) -> list[ShardInfo]:
        return [self.shard(s) for s in range(self.num_shards)]

    def shard(self, s: int) -> ShardInfo:
        return ShardInfo(self.names[s], int(self.samples[s]), int(self.sizes[s]), int(self.ends[s]), self.sha256[s])

    @property
    def total_samples(self) -> int:
        return int(self.samples.sum())

    def fingerprint(self) -> str:
        """Identifies the dataset (names and sizes of shards): a resumed loader must see the same one."""
        if self._fingerprint is None:
            text = "".join(f"{name}:{n}:{size};" for name, n, size in
                           zip(self.names, self.samples.tolist(), self.sizes.tolist()))
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint

    def path(self, shard: ShardInfo) -> Path:
        """The shard's file (a local index only)."""
        if self.store.remote:
            raise ShardError(f"{self.root}: shards on object storage have no local path")
        return Path(self.root) / shard.name

    def url(self, shard: ShardInfo) -> str:
        return self.store.url(shard.name)

    def table(self, s: int) -> SampleTable:
        """Shard s's sample table: cached, or read (version 2), or built from index.json (version 1)."""
        if s in self._tables:
            self._tables.move_to_end(s)
            return self._tables[s]
        shard = self.shard(s)
        if self._v1 is not None:
            table = SampleTable.from_v1(shard, self._v1[s])
        else:
            table = SampleTable.from_npy(shard, self.store.read(table_name(shard.name)))
        self._tables[s] = table
        if len(self._tables) > TABLES_CACHED:
            self._tables.popitem(last=False)
        return table

    def read_samples(self, wanted: Sequence[tuple[int, int]]) -> list[dict[str, bytes] | ShardError]:
        """Members of each (shard number, sample number), checked against their checksums, in one batched read
        (neighbouring samples coalesced on object storage). A damaged sample comes back as its ShardError
        (CorruptSample for a checksum mismatch); a storage failure raises StorageError."""
        tables = [self.table(s) for s, _ in wanted]
        raws = self.store.read_ranges([(t.shard.name, t.sample_range(i)) for t, (_, i) in zip(tables, wanted)])
        return [t.checked(i, raw) for t, (_, i), raw in zip(tables, wanted, raws)]

    def shard_samples(self, s: int, chunk: int = 256) -> Iterator[tuple[int, dict[str, bytes] | ShardError]]:
        """Every sample of shard s in order, as (sample number, members or its ShardError), `chunk` per read."""
        n = int(self.samples[s])
        for lo in range(0, n, chunk):
            numbers = range(lo, min(lo + chunk, n))
            yield from zip(numbers, self.read_samples([(s, i) for i in numbers]))


def load_index(root: str | Path, storage: StorageOptions | None = None, check_files: bool = True) -> ShardIndex:
    """Read index.json of a shard folder or prefix (or the index.json itself), checking that every shard it
    names exists with its size and is readable."""
    root = str(root)
    if root.endswith(INDEX_NAME):
        root = root[: -len(INDEX_NAME)].rstrip("/") or "."
    store = open_store(root, storage)
    where = store.url(INDEX_NAME)
    try:
        raw = json.loads(store.read(INDEX_NAME))
    except StorageError as exc:
        raise ShardError(f"{where}: no shard index (run `knowlip pack` first, or point at its output folder; "
                         f"{exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{where}: not a valid knowlip shard index ({exc})") from exc
    try:
        index = _index_from_json(root, store, raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{where}: not a valid knowlip shard index ({type(exc).__name__}: {exc})") from exc
    if check_files:
        _check_files(index, where)
    return index


def _check_shard_name(name) -> None:
    """A shard is a file inside the index's own folder: a name that could reach outside it is refused."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise ValueError(f"shard name {name!r} is not a plain file name inside the index's folder")


def _index_from_json(root: str, store, raw: dict) -> ShardIndex:
    if not isinstance(raw, dict):
        raise ValueError(f"the top level is a JSON {type(raw).__name__}, not an object")
    index = _columns_from_json(root, store, raw)
    for name in index.names:
        _check_shard_name(name)
    return index


def _columns_from_json(root: str, store, raw: dict) -> ShardIndex:
    info = {k: v for k, v in raw.items() if k not in ("shards", "shard_columns")}
    version = raw.get("version", 1)
    if version == 1:
        entries = raw["shards"]
        column = lambda key: [e[key] for e in entries]
        return ShardIndex(root, store, column("name"), np.asarray(column("samples"), np.int64),
                          np.asarray(column("bytes"), np.int64), np.asarray(column("end"), np.int64),
                          column("sha256"), info, v1_entries=entries)
    if version != FORMAT_VERSION:
        raise ValueError(f"index format version {version} is newer than this knowlip reads ({FORMAT_VERSION})")
    c = raw["shard_columns"]
    return ShardIndex(root, store, list(c["name"]), np.asarray(c["samples"], np.int64),
                      np.asarray(c["bytes"], np.int64), np.asarray(c["end"], np.int64), list(c["sha256"]), info)


def _check_files(index: ShardIndex, where: str) -> None:
    """Every shard present with its size and readable (a stat each; one listing on object storage). The sample
    tables are checked when first read (a missing or damaged one is named then): at 100k shards a second pass
    over the folder would cost a fifth of a loader's start."""
    found = index.store.sizes(index.names)
    for name, size in zip(index.names, index.sizes.tolist()):
        if name not in found:
            raise ShardError(f"{index.store.url(name)}: shard listed in {where} is missing")
        if found[name][0] != size:
            raise ShardError(f"{index.store.url(name)}: size {found[name][0]} differs from the index ({size}); "
                             "re-pack or restore it")
        if not found[name][1]:
            raise ShardError(f"{index.store.url(name)}: shard is not readable (permissions)")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def encode_sample(chip: np.ndarray, caption: str, meta: dict) -> dict[str, bytes]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(chip), allow_pickle=False)
    return {
        CHIP_EXT: buf.getvalue(),
        CAPTION_EXT: caption.encode("utf-8"),
        META_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }


class ShardWriter:
    """Writes samples into numbered shards, rolling over by sample count or size. Each shard is written to a
    staging folder and published to `out` with its sample table (a folder: an atomic rename; an object store:
    an upload), one shard at a time, so local disk holds at most one shard of a remote packing."""

    def __init__(self, out: str | Path, max_samples: int, max_bytes: int, storage: StorageOptions | None = None):
        self.store = open_store(out, storage)
        if self.store.remote:
            import tempfile

            self._staging = Path(tempfile.mkdtemp(prefix="knowlip-pack-"))
        else:
            self._staging = Path(out)
            self._staging.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._rows: list[tuple[int, list[int], int]] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at the first dot)")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._rows.append((self._tar.offset, *member_checksums(members)))
        for ext, payload in members.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        if len(self._rows) >= self.max_samples or self._tar.offset >= self.max_bytes:
            self._close()

    def finish(self) -> list[ShardInfo]:
        """Close the last shard and remove shards (and tables) of an earlier packing that this one did not
        replace (only now, so that a packing that fails part-way leaves the earlier shards it did not reach)."""
        if self._tar is not None:
            self._close()
        kept = {s.name for s in self.shards} | {table_name(s.name) for s in self.shards}
        for old in self.store.list("shard-"):
            if old not in kept and old.endswith((".tar", ".idx.npy")):
                self.store.remove(old)
        if self.store.remote:
            self._staging.rmdir()
        return self.shards

    def _open(self) -> None:
        self._name = f"shard-{len(self.shards):06d}.tar"
        self._tmp = self._staging / f".{self._name}.tmp"
        self._file = _HashingFile(self._tmp.open("wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows = []

    def _close(self) -> None:
        assert self._tar is not None
        end = self._tar.offset
        self._tar.close()
        self._file.close()
        shard = ShardInfo(self._name, len(self._rows), self._tmp.stat().st_size, end, self._file.hexdigest())
        rows = np.zeros(len(self._rows), SAMPLE_TABLE)
        rows["offset"] = [r[0] for r in self._rows]
        rows["checksum"] = [r[1] for r in self._rows]
        rows["members"] = [r[2] for r in self._rows]
        buf = io.BytesIO()
        np.save(buf, rows, allow_pickle=False)
        self.store.write(table_name(self._name), buf.getvalue())  # the table first: a shard never lacks one
        self.store.upload(self._name, self._tmp)
        self.shards.append(shard)
        self._tar = None


class _HashingFile:
    """A write-only file that hashes what passes through it (one pass over the bytes)."""

    def __init__(self, f):
        self._f, self._h = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def write_index(out: str | Path, shards: list[ShardInfo], info: dict, storage: StorageOptions | None = None) -> str:
    """index.json, written (atomically) after every shard and table is in place; returns its path or URL."""
    columns = {key: [getattr(s, key) for s in shards] for key in ("name", "samples", "bytes", "end", "sha256")}
    body = {"format": "knowlip-shards", "version": FORMAT_VERSION, "checksum": CHECKSUM, **info,
            "total_samples": sum(s.samples for s in shards), "num_shards": len(shards), "shard_columns": columns}
    store = open_store(out, storage)
    store.write(INDEX_NAME, json.dumps(body, indent=1).encode())
    return store.url(INDEX_NAME)


def index_v1_body(index: ShardIndex, checksums: bool = True) -> dict:
    """The version-1 form of an index (every offset and hex checksum inside index.json, as knowlip wrote before
    format 2; `checksums=False`: as before per-sample checksums): for compatibility tests and benchmarks."""
    shards = []
    for s in range(index.num_shards):
        table, entry = index.table(s), index.shard(s).__dict__.copy()
        entry["offsets"] = [int(o) for o in table.offsets]
        if checksums and table.checksums is not None:
            entry["checksums"] = [[f"{int(c):016x}" if int(m) >> k & 1 else "" for k, c in enumerate(row)]
                                  for row, m in zip(table.checksums, table.members)]
        shards.append(entry)
    body = {k: v for k, v in index.info.items() if k not in ("version", "checksum")}
    return {**body, "version": 1, **({"checksum": CHECKSUM} if checksums else {}), "shards": shards}


def npy_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload offset) of .npy bytes, without touching the payload."""
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    if fortran or dtype.hasobject:
        raise ValueError("unsupported npy layout (Fortran order or Python objects)")
    return shape, dtype, buf.tell()


def parse_members(raw: bytes) -> dict[str, bytes]:
    """Split the bytes of consecutive tar members into {'__key__': ..., ext: payload}."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos + 512 <= len(raw):
        header = tarfile.TarInfo.frombuf(raw[pos : pos + 512], "utf-8", "surrogateescape")
        start = pos + 512
        payload = raw[start : start + header.size]
        if len(payload) != header.size:
            raise ShardError(f"member {header.name}: truncated")
        key, _, ext = header.name.partition(".")
        if "__key__" in out and out["__key__"] != key.encode():
            raise ShardError(f"member {header.name}: key differs from {out['__key__']!r}")
        out["__key__"] = key.encode()
        out[ext] = payload
        pos = start + (header.size + 511) // 512 * 512
    return out
