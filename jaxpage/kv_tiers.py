"""The tiers under the GPU prefix cache (AttentionStore): host memory, then disk.

A full page of the device pool's prefix cache (saved when it fills, or when the pool evicts it) keeps its
prefix-cache name (`PageKey`) and its K/V moves down: to the host tier (an LRU of a fixed number of pages),
and from there, when the host tier is full, to the disk tier (one checksummed file per page under a directory,
an LRU of a fixed number of files). A prefix lookup that runs out of device pages goes on down the same hash
chain (`KVStore.lookup`), so a conversation's next turn, whose prompt extends the last turn's prompt and
reply, finds its history wherever it was left.

A page's K/V is opaque here: an array of the engine's `[num_layers, 2, num_kv_heads, page_size, head_dim]`,
a jax array in pinned host memory (a GPU's; its copy from the device may still be under way, and reading it
waits) or a numpy array (saved on the CPU, or read from disk). Disk writes and deletions run
on one background thread, in order; a file is written under a temporary name and renamed, and carries a
CRC-32 of its contents, so a crash mid-write, truncation or corruption is seen on read, and that page is a
miss (the caller recomputes it).
"""

import atexit
import collections
import concurrent.futures
import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import struct
import threading
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxpage.page_pool import PageKey, eviction_victim

logger = logging.getLogger(__name__)

_MAGIC = b"JXPGKV02"  # 01: files checksummed with SHA-256, 3.4x slower to check here than CRC-32
_CHECKSUM = struct.Struct("<I")  # zlib.crc32 of everything before it
_MANIFEST = "jaxpage-kv-tier.json"
_SUFFIX = ".kv"


def _result(future: concurrent.futures.Future):
    """A disk read's page, or None if the read failed (the page is then a miss, and the failure is logged: a
    damaged file is already a miss without one, so this is something else, such as staging it to the host)."""
    if future.cancelled():
        return None
    error = future.exception()
    if error is not None:
        logger.warning("KV disk tier: reading a page failed; it is a miss", exc_info=error)
        return None
    return future.result()


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


class DiskTier:
    """Pages as files `<digest hex>.kv` under `directory`, at most `capacity_pages` of them, LRU.

    The directory's manifest names the model and page layout the files belong to (`fingerprint`); a directory
    written for another one is refused rather than misread.
    """

    def __init__(self, directory: str, capacity_pages: int, fingerprint: dict):
        field = "kv_disk_cache_dir"
        path = Path(directory)
        if not path.is_dir():
            raise ValueError(f"engine config field {field}: {directory!r} is not an existing directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"engine config field {field}: directory {directory!r} is not writable")
        assert capacity_pages >= 1, capacity_pages
        self.directory = path
        self.capacity_pages = capacity_pages
        # One process per directory: another would delete this one's files and break its size bound.
        self._lock_file = open(path / ".lock", "a+")  # held until close
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ValueError(
                f"engine config field {field}: directory {directory!r} is in use by another engine"
            ) from None
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as the manifest will read back
        self._check_manifest(fingerprint)
        self._fingerprint = fingerprint_digest(fingerprint)
        for leftover in path.glob("*.tmp"):  # a write that a crash cut short; never read
            leftover.unlink(missing_ok=True)
        files = sorted(path.glob("*" + _SUFFIX), key=lambda f: f.stat().st_mtime)
        self._index: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # LRU order
        for file in files:
            try:
                self._index[bytes.fromhex(file.stem)] = None
            except ValueError:
                continue  # not ours
        # Queued for writing: digest -> [key, K/V]; an eviction empties the K/V so the queue keeps no data.
        self._pending: dict[bytes, list] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self.num_bad_files = 0  # files found truncated, corrupted or of another model on read
        self.wanted: collections.Counter[bytes] | None = None  # digests queued requests want: evicted last
        while len(self._index) > capacity_pages:
            self._evict()
        self._thread = threading.Thread(target=self._work, name="kv-disk-tier", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def close(self) -> None:
        """Finishes the queued writes, stops the writer and frees the directory for another engine."""
        if self._lock_file.closed:
            return
        self._queue.put(None)
        self._thread.join()
        atexit.unregister(self.close)
        self._lock_file.close()

    def _check_manifest(self, fingerprint: dict) -> None:
        manifest = self.directory / _MANIFEST
        if not manifest.exists():
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(fingerprint, sort_keys=True, indent=1))
            os.replace(tmp, manifest)
            return
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"engine config field kv_disk_cache_dir: {str(manifest)!r} is unreadable ({error}); remove "
                "it or choose another directory"
            ) from None
        for name, value in fingerprint.items():
            if not isinstance(found, dict) or found.get(name) != value:
                there = found.get(name) if isinstance(found, dict) else found
                raise ValueError(
                    f"engine config field kv_disk_cache_dir: {str(self.directory)!r} holds the KV of another "
                    f"model or page layout ({name} is {there!r} there, {value!r} here); choose another "
                    "directory"
                )

    def _file(self, digest: bytes) -> Path:
        return self.directory / (digest.hex() + _SUFFIX)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    def put(self, key: PageKey, payload) -> None:
        """Stores a page (written on the background thread); the least recently used file goes if full."""
        with self._lock:
            if key.digest in self._index:
                self._index.move_to_end(key.digest)
                return
            self._index[key.digest] = None
            entry = [key, payload]
            self._pending[key.digest] = entry
            # The entry itself travels, so a write queued before an eviction and a second put of the same
            # page does not write the second's (which its own write, after the deletion, does).
            self._queue.put(("write", entry))
            while len(self._index) > self.capacity_pages:
                self._evict()

    def touch(self, digest: bytes) -> None:
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)

    def discard(self, digest: bytes) -> None:
        with self._lock:
            if digest in self._index:
                del self._index[digest]
                self._drop_pending(digest)
                self._queue.put(("delete", digest))

    def _evict(self) -> None:
        if self.wanted:
            digest = eviction_victim(self._index, self.wanted.__contains__)
            del self._index[digest]
        else:
            digest, _ = self._index.popitem(last=False)
        self._drop_pending(digest)
        self._queue.put(("delete", digest))

    def _drop_pending(self, digest: bytes) -> None:
        entry = self._pending.pop(digest, None)
        if entry is not None:
            entry[1] = None  # its queued write is skipped

    def get(self, key: PageKey) -> np.ndarray | None:
        """The page's K/V, or None if absent or its file is damaged (then the file is removed)."""
        with self._lock:
            if key.digest not in self._index:
                return None
            self._index.move_to_end(key.digest)
            pending = self._pending.get(key.digest)
        if pending is not None:
            return pending[1]
        data = self._read(key)
        if data is None:
            with self._lock:
                # Unless it was evicted, or evicted and stored again, while the file was read.
                if key.digest in self._index and key.digest not in self._pending:
                    self.num_bad_files += 1
                    del self._index[key.digest]
                    self._queue.put(("delete", key.digest))
        return data

    def _read(self, key: PageKey) -> np.ndarray | None:
        try:
            blob = self._file(key.digest).read_bytes()
        except OSError:
            return None
        size = _CHECKSUM.size
        body = memoryview(blob)[:-size]  # a view: no copy of the page's bytes
        if (
            len(blob) < len(_MAGIC) + 4 + size
            or zlib.crc32(body) != _CHECKSUM.unpack_from(blob, len(body))[0]
        ):
            return None
        if body[: len(_MAGIC)] != _MAGIC:
            return None
        (header_len,) = struct.unpack_from("<I", body, len(_MAGIC))
        start = len(_MAGIC) + 4
        try:
            header = json.loads(bytes(body[start : start + header_len]))
        except ValueError:
            return None
        if not isinstance(header, dict):
            return None
        if header.get("fingerprint") != self._fingerprint or header.get("token_ids") != list(key.token_ids):
            return None
        payload = body[start + header_len :]
        try:
            dtype = np.dtype(getattr(ml_dtypes, header["dtype"], header["dtype"]))  # bfloat16 is ml_dtypes'
            return np.frombuffer(payload, dtype=dtype).reshape(header["shape"])
        except (TypeError, ValueError, KeyError):
            return None

    def _write(self, key: PageKey, data: np.ndarray) -> None:
        header = json.dumps(
            {
                "fingerprint": self._fingerprint,
                "token_ids": list(key.token_ids),
                "dtype": str(data.dtype),
                "shape": list(data.shape),
            }
        ).encode()
        body = _MAGIC + struct.pack("<I", len(header)) + header + np.ascontiguousarray(data).tobytes()
        file = self._file(key.digest)
        tmp = file.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.write(_CHECKSUM.pack(zlib.crc32(body)))
            os.replace(tmp, file)  # atomic: a reader sees the whole file or none
        finally:
            tmp.unlink(missing_ok=True)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                op, what = item
                if op == "write":
                    key, payload = what
                    with self._lock:
                        current = payload is not None and self._pending.get(key.digest) is what
                    if current:
                        self._write(key, np.asarray(payload))
                        with self._lock:
                            if self._pending.get(key.digest) is what:
                                del self._pending[key.digest]
                else:
                    self._file(what).unlink(missing_ok=True)
            except Exception:  # the writer must outlive any one page
                # A full or failing disk (or a page that cannot be read) loses that page, never the engine.
                logger.warning("KV disk tier: %s failed", item[0], exc_info=True)
                with self._lock:
                    if item[0] == "write" and self._pending.get(item[1][0].digest) is item[1]:
                        del self._index[item[1][0].digest]
                        del self._pending[item[1][0].digest]
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Waits until every queued write and deletion is done."""
        self._queue.join()


class KVStore:
    """The host tier, with the disk tier below it (optional): what the prefix cache asks when the device
    pool misses.

    Look-ahead (the AttentionStore paper's scheduler-aware prefetch and eviction), with `lookahead`: the pages
    that queued requests will look up are `want`ed. Those on disk are read into the host tier by the reading
    threads while the requests wait (they join the host tier at the next `settle` or `lookup`), and each tier
    (the device pool too, see `PagePool.wanted`) evicts the least recently used page that no queued request
    wants.
    """

    def __init__(self, host_capacity_pages: int, disk: DiskTier | None = None, lookahead: bool = True):
        assert host_capacity_pages >= 1, host_capacity_pages
        self.host_capacity_pages = host_capacity_pages
        self.disk = disk
        self.lookahead = lookahead
        self._host: collections.OrderedDict[bytes, tuple[PageKey, object]] = collections.OrderedDict()
        # digest -> how many queued requests want it
        self.wanted: collections.Counter[bytes] = collections.Counter()
        if disk is not None and lookahead:
            disk.wanted = self.wanted
        # Disk reads run on pools of threads (file reads, checksums and copies into pinned memory all let go
        # of the GIL): one reads ahead, one serves lookups, so a lookup never queues behind the read-ahead of
        # every queued request. A read ahead already under way is shared: a lookup of that page waits for it;
        # one still queued is cancelled and read on the lookup's pool.
        threads = concurrent.futures.ThreadPoolExecutor
        self._readers = None if disk is None else threads(8, "kv-disk-read-ahead")
        self._lookup_readers = None if disk is None else threads(8, "kv-disk-read")
        self._reading: dict[bytes, tuple[PageKey, concurrent.futures.Future]] = {}  # read ahead, in flight
        self._read: queue.SimpleQueue = queue.SimpleQueue()  # read-ahead futures done, to collect
        self.num_prefetched = 0  # pages read from disk ahead of their request's admission
        # Turns a page read from disk into what loads take fastest (the engine's: an array in pinned host
        # memory), on the reading thread. None: kept as read.
        self.stage = None

    @property
    def num_host_pages(self) -> int:
        return len(self._host)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._host or (self.disk is not None and digest in self.disk)

    def host_entries(self) -> list[tuple[PageKey, object]]:
        return list(self._host.values())

    def save(self, key: PageKey, payload) -> None:
        """Puts a page saved from the device (filled, or evicted) into the host tier; a page of the host tier
        goes to disk (or is dropped) if full."""
        if key.digest in self._host:
            self._host.move_to_end(key.digest)
            return
        self._host[key.digest] = (key, payload)
        while len(self._host) > self.host_capacity_pages:
            old_key, old_payload = self._host.pop(self._victim())
            if self.disk is not None:
                self.disk.put(old_key, old_payload)

    def _victim(self) -> bytes:
        if not self.wanted:
            return next(iter(self._host))
        return eviction_victim(self._host, self.wanted.__contains__)

    def touch(self, key: PageKey) -> None:
        if key.digest in self._host:
            self._host.move_to_end(key.digest)
        elif self.disk is not None:
            self.disk.touch(key.digest)

    def discard(self, keys: list[PageKey]) -> None:
        """Forgets these pages in every tier (their K/V may be garbage)."""
        for key in keys:
            self._reading.pop(key.digest, None)  # a read ahead under way must not bring it back
            if self._host.pop(key.digest, None) is None and self.disk is not None:
                self.disk.discard(key.digest)

    def settle(self) -> None:
        """Called every step: pages read ahead from disk join the host tier."""
        self._collect()

    def close(self) -> None:
        """Stops the disk reads and closes the disk tier (after its queued writes)."""
        if self.disk is not None:
            self._readers.shutdown(cancel_futures=True)
            self._lookup_readers.shutdown(cancel_futures=True)
            self.disk.close()

    # ---- look-ahead ----------------------------------------------------------------------------------------

    def want(self, keys: list[PageKey]) -> None:
        """A queued request will look `keys` up: keep them in the host tier, and read those on disk ahead."""
        if not self.lookahead:
            return
        self.wanted.update(key.digest for key in keys)
        if self.disk is None:
            return
        for key in keys:
            if key.digest in self._host or key.digest in self._reading:
                continue
            if key.digest not in self.disk:
                continue  # perhaps still on the device; a later page may be on disk all the same
            future = self._readers.submit(self._read_page, key)
            self._reading[key.digest] = (key, future)
            future.add_done_callback(lambda _, key=key, future=future: self._read.put((key, future)))

    def unwant(self, keys: list[PageKey]) -> None:
        if not self.lookahead:
            return
        self.wanted.subtract(key.digest for key in keys)
        for key in keys:
            if self.wanted[key.digest] <= 0:
                del self.wanted[key.digest]

    def _read_page(self, key: PageKey):
        data = self.disk.get(key)
        return data if data is None or self.stage is None else self.stage(data)

    def _collect(self) -> None:
        """Moves pages read ahead into the host tier."""
        while True:
            try:
                key, future = self._read.get_nowait()
            except queue.Empty:
                return
            if self._reading.get(key.digest, (None, None))[1] is not future:
                continue  # a lookup took it
            del self._reading[key.digest]
            data = _result(future)
            if data is not None and key.digest not in self._host:
                self.save(key, data)
                self.num_prefetched += 1

    # ---- lookup --------------------------------------------------------------------------------------------

    def _read_future(self, key: PageKey) -> concurrent.futures.Future:
        """The page's read ahead, if under way (the lookup takes it over), else a new read."""
        entry = self._reading.pop(key.digest, None)
        if entry is not None and not entry[1].cancel():  # running or done: cancel() refuses
            return entry[1]
        return self._lookup_readers.submit(self._read_page, key)

    def _only_on_disk(self, key: PageKey) -> bool:
        return key.digest not in self._host and key.digest in self.disk

    def lookup(self, keys: list[PageKey], limit: int, disk: bool = True) -> list[tuple[str, object]]:
        """(tier, K/V) of the longest run of leading `keys` (at most `limit`) found in the host tier or (with
        `disk`) on disk. A page read from disk is put back in the host tier."""
        self._collect()
        found, from_disk, keys = [], [], keys[:limit]
        while len(found) < len(keys):
            key = keys[len(found)]
            entry = self._host.get(key.digest)
            if entry is not None and entry[0].token_ids == key.token_ids:
                self._host.move_to_end(key.digest)
                found.append(("host", entry[1]))
                continue
            # The run of pages on disk from here is read on the reading threads at once, sharing the reads
            # already under way; the first miss ends the walk.
            run = (
                list(itertools.takewhile(self._only_on_disk, keys[len(found) :]))
                if disk and self.disk is not None
                else []
            )
            read = [_result(future) for future in [self._read_future(key) for key in run]]
            hits = list(itertools.takewhile(lambda pair: pair[1] is not None, zip(run, read, strict=True)))
            found += [("disk", data) for _, data in hits]
            from_disk += hits
            if not run or len(hits) < len(run):
                break
        for key, data in from_disk:  # after the walk, so that they push none of its own hits down
            self.save(key, data)
        return found
