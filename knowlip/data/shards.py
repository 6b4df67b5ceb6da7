"""WebDataset tar shards: the on-disk format between `knowlip pack` and the streaming loader.

A sample is three tar members sharing a key: `KEY.chip.npy` (raw chip, native dtype, (C, H, W)),
`KEY.txt` (caption) and `KEY.json` (metadata: georeference, product, keyword spans of the caption).
Shards are plain POSIX tar files written deterministically (fixed mtime/owner, sorted inputs), so the same
inputs give byte-identical shards, and `tar tf` or any webdataset reader lists them.

`index.json` is the manifest: per shard its sample count, size and the byte offset of every sample, which
lets the loader seek straight to any sample (O(1) resume), plus totals and the packing report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import xxhash

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
CHIP_EXT, CAPTION_EXT, META_EXT = "chip.npy", "txt", "json"
MEMBERS = (CHIP_EXT, CAPTION_EXT, META_EXT)
# Per-member checksums: xxHash's XXH3-64 (python-xxhash, maintained, wheels everywhere). Not cryptographic (the
# shard's sha256 is), but ~10x the speed of zlib's CRC32 and well past memory bandwidth, so the loader can
# verify every sample it reads for well under 1% of its time.
CHECKSUM = "xxh3_64"


class ShardError(ValueError):
    """A shard or index that cannot be used; the message names the file."""


class CorruptSample(ShardError):
    """A sample whose bytes do not match the checksums recorded when it was packed."""


def member_checksums(members: dict[str, bytes]) -> list[str]:
    """XXH3-64 hex digests of a sample's members, in MEMBERS order ('' for a missing one)."""
    return [xxhash.xxh3_64_hexdigest(members[ext]) if ext in members else "" for ext in MEMBERS]


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    offsets: list[int]  # byte offset of each sample's first member
    end: int  # byte offset just past the last sample (start of the tar end-of-archive blocks)
    sha256: str = ""
    checksums: Optional[list[list[str]]] = None  # per sample, per member (MEMBERS); None in older indexes

    def sample_range(self, i: int) -> tuple[int, int]:
        """(offset, length) in bytes of sample i's members."""
        stop = self.offsets[i + 1] if i + 1 < self.samples else self.end
        return self.offsets[i], stop - self.offsets[i]


@dataclass
class ShardIndex:
    root: Path
    shards: list[ShardInfo]
    info: dict = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def fingerprint(self) -> str:
        """Identifies the dataset (names and sizes of shards): a resumed loader must see the same one."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{s.samples}:{s.bytes};".encode())
        return h.hexdigest()[:16]

    def path(self, shard: ShardInfo) -> Path:
        return self.root / shard.name


def load_index(root: str | Path) -> ShardIndex:
    """Read index.json of a shard folder, checking that every shard it names exists with its size."""
    root = Path(root)
    path = root / INDEX_NAME if root.is_dir() else root
    if not path.is_file():
        raise ShardError(f"{path}: no shard index (run `knowlip pack` first, or point at its output folder)")
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(**{k: s[k] for k in ("name", "samples", "bytes", "offsets", "end", "sha256")},
                            checksums=s.get("checksums")) for s in raw["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: not a valid knowlip shard index ({exc})") from exc
    index = ShardIndex(path.parent, shards, {k: v for k, v in raw.items() if k != "shards"})
    for s in shards:
        p = index.path(s)
        if not p.is_file():
            raise ShardError(f"{p}: shard listed in {path} is missing")
        if p.stat().st_size != s.bytes:
            raise ShardError(f"{p}: size {p.stat().st_size} differs from the index ({s.bytes}); re-pack or restore it")
    return index


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
    """Writes samples into numbered shards, rolling over by sample count or size; atomic per shard."""

    def __init__(self, out_dir: str | Path, max_samples: int, max_bytes: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._offsets: list[int] = []
        self._checksums: list[list[str]] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at the first dot)")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._offsets.append(self._tar.offset)
        self._checksums.append(member_checksums(members))
        for ext, payload in members.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        if len(self._offsets) >= self.max_samples or self._tar.offset >= self.max_bytes:
            self._close()

    def finish(self) -> list[ShardInfo]:
        """Close the last shard and remove shards of an earlier packing that this one did not replace
        (only now, so that a packing that fails part-way leaves the earlier shards it did not reach)."""
        if self._tar is not None:
            self._close()
        kept = {s.name for s in self.shards}
        for old in self.out_dir.glob("shard-*.tar"):
            if old.name not in kept:
                old.unlink()
        return self.shards

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._name = name
        self._file = _HashingFile(self._tmp.open("wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._offsets, self._checksums = [], []

    def _close(self) -> None:
        assert self._tar is not None
        end = self._tar.offset
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        size = (self.out_dir / self._name).stat().st_size
        self.shards.append(ShardInfo(self._name, len(self._offsets), size, self._offsets, end, self._file.hexdigest(),
                                     self._checksums))
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


def write_index(out_dir: str | Path, shards: list[ShardInfo], info: dict) -> Path:
    """index.json, written atomically after every shard is in place."""
    out_dir = Path(out_dir)
    body = {"format": "knowlip-shards", "version": FORMAT_VERSION, "checksum": CHECKSUM, **info,
            "total_samples": sum(s.samples for s in shards), "num_shards": len(shards),
            "shards": [s.__dict__ for s in shards]}
    tmp = out_dir / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, out_dir / INDEX_NAME)
    return out_dir / INDEX_NAME


def npy_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload offset) of .npy bytes, without touching the payload."""
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    if fortran or dtype.hasobject:
        raise ValueError("unsupported npy layout (Fortran order or Python objects)")
    return shape, dtype, buf.tell()


def read_sample_bytes(f, shard: ShardInfo, i: int) -> dict[str, bytes]:
    """Members of sample i, read with one positioned read from an open shard file and checked against the
    checksums recorded at packing (CorruptSample when they differ)."""
    offset, length = shard.sample_range(i)
    raw = os.pread(f.fileno(), length, offset)
    if len(raw) != length:
        raise ShardError(f"{shard.name}: truncated at sample {i}")
    members = parse_members(raw)
    verify_sample(shard, i, members)
    return members


def verify_sample(shard: ShardInfo, i: int, members: dict[str, bytes]) -> None:
    """Raise CorruptSample, naming the shard, sample and member, when bytes differ from those packed."""
    if not shard.checksums:
        return  # an index written before checksums: nothing to compare with
    for ext, expected, got in zip(MEMBERS, shard.checksums[i], member_checksums(members)):
        if expected != got:
            key = members.get("__key__", b"?").decode(errors="replace")
            raise CorruptSample(f"{shard.name} sample {i} ({key}): {ext or 'member'} bytes differ from the checksum "
                                "recorded at packing (damaged shard)")


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
