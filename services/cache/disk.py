"""The disk tier: one safetensors file per entry, an LRU index rebuilt from the directory at start.

Files are plain safetensors (readable by `mx.load` / `safetensors`), with the entry's key,
namespace, metadata and an xxh3-128 checksum in the header's `__metadata__`. The checksum covers
the whole header (key, metadata, dtypes, shapes, offsets) and every data byte, so any flipped or
lost byte is caught: the start-up scan checks each header and the file size (truncation), every
read checks the checksum, and a bad file is counted, logged, deleted and reported as a miss so
the caller recomputes it. Files of the earlier CRC32 format fail the same checks and go too.

The LRU order is the files' mtimes (touched on every hit), so it survives a restart. Disk
trouble (full, read-only, corrupt files) is counted in `errors` and logged, never raised: the
disk tier is an optimisation and the service must keep serving from memory without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
import xxhash

from services.cache.store import (
    DTYPE_SIZES,
    Entry,
    EntryId,
    TensorData,
    TierStats,
    count_for,
    tensor_nbytes,
)

log = structlog.get_logger("cache.disk")

SUFFIX = ".safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# safetensors' dtype codes for every dtype the cache accepts.
_ST_DTYPES = dict(bool="BOOL", uint8="U8", uint16="U16", uint32="U32", uint64="U64", int8="I8")
_ST_DTYPES |= dict(int16="I16", int32="I32", int64="I64", float16="F16", bfloat16="BF16")
_ST_DTYPES |= dict(float32="F32", float64="F64", complex64="C64")
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
assert set(_ST_DTYPES) == set(DTYPE_SIZES)
_CHECKSUM = "prism.xxh3_128"


class CorruptFileError(ValueError):
    pass


@dataclass
class _Record:
    path: Path
    size: int  # bytes on disk, what the cap counts


def checksum(header: dict, data: Iterable[bytes | memoryview]) -> str:
    """xxh3-128 of the header without its checksum field (canonical JSON) and of the data."""
    fields = dict(header, __metadata__=dict(header["__metadata__"]))
    fields["__metadata__"].pop(_CHECKSUM, None)
    digest = xxhash.xxh3_128(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for part in data:
        digest.update(part)
    return digest.hexdigest()


def encode_header(entry: Entry) -> bytes:
    """The 8-byte length prefix and the JSON header (padded to 8 bytes so data is aligned)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, t in entry.tensors.items():
        end = offset + len(t.data)
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    header["__metadata__"] = {
        "prism.key": entry.key,
        "prism.namespace": entry.namespace,
        "prism.metadata": json.dumps(entry.metadata, sort_keys=True),
    }
    data = [t.data for t in entry.tensors.values()]
    header["__metadata__"][_CHECKSUM] = checksum(header, data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_header(data: bytes, file_size: int) -> tuple[dict, int]:
    """Parse and sanity-check a header from the file's first bytes; returns (header, data start)."""
    if len(data) < 8:
        raise CorruptFileError("truncated length prefix")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > file_size or len(data) < 8 + n:
        raise CorruptFileError("bad header length")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.pop("__metadata__")
        if not all(isinstance(meta[k], str) for k in ("prism.key", "prism.namespace")):
            raise TypeError("key and namespace must be strings")
        if not isinstance(meta[_CHECKSUM], str):  # earlier formats have no such field
            raise TypeError("checksum must be a string")
        pos = 0
        spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items())
        for (start, end), name in spans:  # contiguous and sized as declared
            t = header[name]
            if start != pos or end - start != tensor_nbytes(
                _FROM_ST[t["dtype"]], tuple(t["shape"])
            ):
                raise CorruptFileError(f"bad offsets for {name}")
            pos = end
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"bad header: {exc}") from exc
    if 8 + n + pos != file_size:
        raise CorruptFileError("size does not match header")
    header["__metadata__"] = meta
    return header, 8 + n


def decode_entry(data: bytes) -> Entry:
    header, start = read_header(data, len(data))
    if checksum(header, [memoryview(data)[start:]]) != header["__metadata__"][_CHECKSUM]:
        raise CorruptFileError("checksum mismatch")
    meta = header.pop("__metadata__")
    tensors = {}
    for name, t in header.items():  # our own files list tensors in wire order
        a, b = t["data_offsets"]
        tensors[name] = TensorData(
            _FROM_ST[t["dtype"]], tuple(t["shape"]), data[start + a : start + b]
        )
    metadata = json.loads(meta["prism.metadata"])
    return Entry(meta["prism.key"], meta["prism.namespace"], tensors, metadata)


class DiskStore:
    """Thread-safe disk tier under `root` holding at most `capacity_bytes` of files."""

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int) -> None:
        self.root = Path(root)
        self.capacity = capacity_bytes
        self.errors = 0
        self._index: OrderedDict[EntryId, _Record] = OrderedDict()  # oldest access first
        self._bytes = 0  # sum of the indexed files' sizes
        self._hits: Counter[str] = Counter()
        self._evictions: Counter[str] = Counter()
        self._lock = threading.Lock()  # guards the index and counters
        self._write_lock = threading.Lock()  # one writer at a time keeps the byte cap exact
        self._scan()

    def path_for(self, namespace: str, key: str) -> Path:
        # Hashed names: keys are arbitrary strings; two-level fan-out keeps directories small.
        digest = hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    def _error(self, event: str, path: Path, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
        log.warning(event, path=str(path), error=f"{type(exc).__name__}: {exc}")

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._error("disk_delete_failed", path, exc)

    def _scan(self) -> None:
        """Rebuild the index from the files; drop temp leftovers and corrupt files."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            paths = [p for d in self.root.iterdir() if d.is_dir() for p in d.iterdir()]
        except OSError as exc:
            self._error("disk_scan_failed", self.root, exc)
            return
        found = []
        for path in paths:
            if not path.name.endswith(SUFFIX):  # a write that died before os.replace
                self._unlink(path)
                continue
            try:
                st = path.stat()
                with path.open("rb") as f:
                    head = f.read(8)
                    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                    head += f.read(min(n, _MAX_HEADER))
                meta = read_header(head, st.st_size)[0]["__metadata__"]
            except (OSError, CorruptFileError, struct.error) as exc:
                self._error("disk_corrupt_file", path, exc)
                self._unlink(path)
                continue
            entry_id = (meta["prism.namespace"], meta["prism.key"])
            found.append((st.st_mtime_ns, entry_id, _Record(path, st.st_size)))
        for _, entry_id, record in sorted(found, key=lambda f: f[0]):
            old = self._pop_locked(entry_id)
            if old is not None:  # only if files were copied in by hand: keep the newest
                self._unlink(old.path)
            self._add_locked(entry_id, record)
        with self._lock:
            self._evict_locked(self.capacity)
        log.info("disk_index_loaded", path=str(self.root), entries=len(self._index))

    def _add_locked(self, entry_id: EntryId, record: _Record) -> None:
        self._index[entry_id] = record
        self._bytes += record.size

    def _pop_locked(self, entry_id: EntryId) -> _Record | None:
        record = self._index.pop(entry_id, None)
        if record is not None:
            self._bytes -= record.size
        return record

    def _evict_locked(self, target_bytes: int) -> None:
        while self._index and self._bytes > target_bytes:
            (namespace, key), record = next(iter(self._index.items()))
            self._pop_locked((namespace, key))
            self._evictions[namespace] += 1
            try:
                record.path.unlink(missing_ok=True)
            except OSError as exc:
                self.errors += 1
                log.warning("disk_delete_failed", path=str(record.path), error=str(exc))

    def put(self, entry: Entry) -> bool:
        """Write (or replace) an entry atomically. False when refused or the write failed."""
        head = encode_header(entry)
        size = len(head) + entry.nbytes
        if size > self.capacity:  # the cap itself is too small: say so, it is a setting to fix
            with self._lock:
                self.errors += 1
            log.warning("disk_entry_over_capacity", key=entry.key, bytes=size, cap=self.capacity)
            return False
        path = self.path_for(entry.namespace, entry.key)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        with self._write_lock:
            with self._lock:
                old = self._pop_locked(entry.id)
                self._evict_locked(self.capacity - size)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as f:
                    f.write(head)
                    for t in entry.tensors.values():
                        f.write(t.data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # readers see the old file or the new one, never half
            except OSError as exc:
                self._error("disk_write_failed", path, exc)
                self._unlink(tmp)
                if old is not None:  # os.replace never ran: the previous file is intact
                    with self._lock:
                        self._add_locked(entry.id, old)
                return False
            with self._lock:
                self._add_locked(entry.id, _Record(path, size))
        return True

    def get(self, namespace: str, key: str) -> Entry | None:
        with self._lock:
            record = self._index.get((namespace, key))
        if record is None:
            return None
        try:
            entry = decode_entry(record.path.read_bytes())
            if entry.id != (namespace, key):  # a file copied or renamed in by hand
                raise CorruptFileError(f"file holds {entry.id}")
        except FileNotFoundError:  # evicted or reset between the lookup and the read
            return None
        except (OSError, CorruptFileError, ValueError, KeyError) as exc:
            self._error("disk_corrupt_file", record.path, exc)
            self._drop(namespace, key, record)
            return None
        self._touch(namespace, key, record)
        return entry

    def use(self, namespace: str, key: str) -> bool:
        """`contains` that counts as a hit and refreshes the entry's LRU position (a caller that
        decides by presence alone, like the encoder, is using the entry all the same)."""
        with self._lock:
            record = self._index.get((namespace, key))
        if record is not None:
            self._touch(namespace, key, record)
        return record is not None

    def _touch(self, namespace: str, key: str, record: _Record) -> None:
        with contextlib.suppress(OSError):
            os.utime(record.path)  # the access time that orders eviction after a restart
        with self._lock:
            if self._index.get((namespace, key)) is record:
                self._index.move_to_end((namespace, key))
            self._hits[namespace] += 1

    def _drop(self, namespace: str, key: str, record: _Record) -> None:
        """Delete a bad file, unless a newer put of the key replaced it meanwhile."""
        with self._lock:
            if self._index.get((namespace, key)) is not record:
                return
            self._pop_locked((namespace, key))
        self._unlink(record.path)

    def contains(self, namespace: str, key: str) -> bool:
        with self._lock:
            return (namespace, key) in self._index

    def delete(self, namespace: str, key: str) -> bool:
        with self._lock:
            record = self._pop_locked((namespace, key))
        if record is not None:
            self._unlink(record.path)
        return record is not None

    def reset(self, namespace: str = "") -> set[EntryId]:
        with self._lock:
            ids = {i for i in self._index if not namespace or i[0] == namespace}
            records = [self._pop_locked(i) for i in ids]
        for record in records:
            if record is not None:
                self._unlink(record.path)
        return ids

    def stats(self, namespace: str = "") -> TierStats:
        with self._lock:
            sizes = [r.size for i, r in self._index.items() if not namespace or i[0] == namespace]
            return TierStats(
                entries=len(sizes),
                bytes=sum(sizes),
                capacity=self.capacity,
                hits=count_for(self._hits, namespace),
                evictions=count_for(self._evictions, namespace),
            )
