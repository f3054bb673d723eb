"""sha256 of a file while it is read, on another thread, without stalling the reader's Python.

Two ways, by what the manifest holds. A file with per-chunk digests (``chunks``, recorded at
publish since they were added) is checked by :class:`ChunksWhileReading`: the server's hasher
thread takes chunks as the read brings them in and the loading thread takes the rest once it is
done with its own work, one ``hashlib.sha256`` call per chunk, which releases the GIL while it
hashes, so the two cores share the hash. A file without them (published before) gets
:class:`ShaWhileReading`, one sha256 on the hasher thread, as follows.

hashlib releases the GIL while it hashes more than 2 KiB, so a hasher thread and the reading thread
use both cores. The catch is the GIL *between* two ``update`` calls: a hasher that wants it back
while the reader runs plain Python waits for CPython's switch interval (5 ms), longer than the whole
hash of a LoRA adapter (seen: a 2.6 ms hash finishing 5.5 ms after the read began). So the hasher
hashes what has been read so far in slices while the read goes on (the reader sits in ``readinto``
then, without the GIL), and :meth:`ShaWhileReading.finish` returns once the hasher is inside its
last ``update``, which covers everything left: from then on it needs the GIL only to return the
digest, by which time the reader waits for it.

The chunks need the GIL back between two ``hashlib`` calls too, but a chunk is ~0.15 ms of hashing
and the reader sits in ``readinto`` or in the same check most of that time. A C verifier that took
no GIL at all (``registry/_chunksha.c``, removed) read and checked a 20 MB LoRA 1-3% faster and an
80 MB one 1% faster, and a 20 MB load that builds its serving form in between 3-11% faster
(``bench/chunk_hashing.py``): not worth a C extension linked to OpenSSL.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

from .manifest import FileEntry

if TYPE_CHECKING:
    from .manifest import FileEntry

SLICE = 256 << 10  # bytes per update while the read goes on: bounds the wait in finish() (~0.2 ms)
MIN_CHUNK = 256 << 10  # publish records chunk digests for files over this; a read slice lands as often
MAX_CHUNKS = 1024  # per file: bigger files get bigger chunks (a 1 GB file: 1 MiB ones, 66 kB of manifest)


def chunk_size_for(size: int) -> int | None:
    """The chunk size publish records digests for, for a file of ``size`` bytes; None when one
    chunk would hold it all (nothing to share between threads)."""
    if size <= MIN_CHUNK:
        return None
    chunk = MIN_CHUNK
    while size > chunk * MAX_CHUNKS:
        chunk *= 2
    return chunk


class FileDigests:
    """The sha256 of a stream and, with ``chunk_size``, of each ``chunk_size`` bytes of it, in one
    pass (what publish records while it copies a file into the store)."""

    def __init__(self, chunk_size: int | None):
        self.chunk_size = chunk_size
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self._chunks: list[str] = []
        self.size = 0

    def update(self, data) -> None:
        self._whole.update(data)
        self.size += len(data)
        if self.chunk_size is None:
            return
        view, at = memoryview(data), 0
        while at < len(view):
            take = min(len(view) - at, self.chunk_size - self._in_chunk)
            self._chunk.update(view[at:at + take])
            at += take
            self._in_chunk += take
            if self._in_chunk == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk, self._in_chunk = hashlib.sha256(), 0

    def entry(self) -> "FileEntry":
        if self.chunk_size is None:
            return FileEntry(self._whole.hexdigest(), self.size)
        chunks = self._chunks + ([self._chunk.hexdigest()] if self._in_chunk or not self._chunks else [])
        return FileEntry(self._whole.hexdigest(), self.size, self.chunk_size, tuple(chunks))


def verify_while_reading(executor: Executor | None, entry: "FileEntry", buffer: bytearray):
    """What checks ``buffer`` against ``entry`` while a read fills it: its chunks where it has
    them (and a hasher thread shares the work), else its whole sha256 (both take ``advanced``,
    ``finish`` and ``matches``)."""
    if entry.chunks and executor is not None:
        return ChunksWhileReading(executor, buffer, entry)
    return ShaWhileReading(executor, entry.size, expected=entry.sha256)


_PENDING, _MATCHED, _MISMATCHED, _UNREAD = range(4)


class Verifier:
    """A buffer's chunk digests, checked from any number of threads as a read fills it.

    ``expected`` is the chunks' 32-byte sha256 digests back to back; the buffer is held (a
    ``bytearray`` cannot be resized) until the Verifier goes. The reader calls :meth:`advanced`
    as bytes come in and :meth:`read_over` when it stops; :meth:`run` hashes chunks until none is
    left to take (each chunk by one thread, once it is all in; one ``hashlib.sha256`` call each,
    without the GIL); :meth:`wait` returns the indexes of the chunks that did not match or were
    never read.
    """

    def __init__(self, buffer, chunk_size: int, expected: bytes):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        view = memoryview(buffer).cast("B")
        count = -(-len(view) // chunk_size)
        if len(expected) != 32 * count:
            raise ValueError(f"{len(view)} bytes in {chunk_size}-byte chunks need {count} digests, "
                             f"got {len(expected)} bytes of them")
        self._view, self._chunk, self._count = view, chunk_size, count
        self._expected = bytes(expected)
        self._state = bytearray(count)
        self._read_end, self._read_over = 0, False
        self._next = self._done = 0  # under _changed
        self._changed = threading.Condition()

    def advanced(self, end: int) -> None:
        """Bytes ``[0, end)`` of the buffer are in."""
        if not 0 <= end <= len(self._view):
            raise ValueError(f"end {end} outside the buffer")
        with self._changed:
            self._read_end = end
            self._changed.notify_all()

    def read_over(self) -> None:
        """The read stopped; chunks past it are never read."""
        with self._changed:
            self._read_over = True
            self._changed.notify_all()

    def run(self) -> int:
        """Hash chunks until none is left to take; returns how many this call hashed."""
        view, chunk, size, expected = self._view, self._chunk, len(self._view), self._expected
        hashed, index, state = 0, -1, _PENDING
        while True:
            with self._changed:
                if index >= 0:  # the last one's result and the next one's claim: one lock
                    self._state[index] = state
                    self._done += 1
                    if self._done == self._count:
                        self._changed.notify_all()
                if self._next >= self._count:
                    return hashed
                index = self._next
                self._next += 1
                start, stop = index * chunk, min(size, (index + 1) * chunk)
                while self._read_end < stop and not self._read_over:
                    self._changed.wait()
                read = self._read_end >= stop
            state = _UNREAD
            if read:
                digest = hashlib.sha256(view[start:stop]).digest()
                state = _MATCHED if digest == expected[32 * index:32 * index + 32] else _MISMATCHED
                hashed += 1

    def wait(self) -> list[int]:
        """Wait for every chunk; the indexes of those that failed (mismatched or never read)."""
        with self._changed:
            while self._done < self._count:
                self._changed.wait()
        return [i for i, state in enumerate(self._state) if state != _MATCHED]


class ChunksWhileReading:
    """A buffer's chunk digests checked by the hasher thread as the read goes on, and by the
    caller of :meth:`matches` (the loading thread, its own work done) alongside it."""

    def __init__(self, executor: Executor, buffer: bytearray, entry: "FileEntry"):
        self._verifier = Verifier(buffer, entry.chunk_size, b"".join(bytes.fromhex(d) for d in entry.chunks))
        executor.submit(self._verifier.run)  # now, so the thread is awake when the first slice lands

    def advanced(self, view: memoryview, end: int) -> None:
        self._verifier.advanced(end)

    def finish(self) -> None:
        self._verifier.read_over()

    def matches(self) -> bool:
        self._verifier.run()
        return not self._verifier.wait()


class ShaWhileReading:
    """The sha256 of one buffer being filled front to back.

    The reader calls :meth:`advanced` after each piece it read and :meth:`finish` once the read is
    over (complete or not); ``finish`` returns a future of the hex digest. Without an executor, or
    for a buffer of one slice or less, ``finish`` hashes in the calling thread.
    """

    def __init__(self, executor: Executor | None, size: int, expected: str | None = None):
        self._executor = executor if size > SLICE else None
        self._expected = expected
        self._view: memoryview | None = None
        self._read = self._hashed = 0
        self._complete = False
        self._changed = threading.Condition()
        self._last_started = threading.Event()
        self._future: Future | None = None

    def advanced(self, view: memoryview, end: int) -> None:
        """Bytes ``view[:end]`` are in (``view`` the whole buffer, the same on every call)."""
        with self._changed:
            self._view, self._read = view, end
            self._changed.notify()
        if self._future is None and self._executor is not None:
            self._future = self._executor.submit(self._run)

    def finish(self) -> Future:
        """The read is over; the future's result is the hex digest of what it brought in."""
        with self._changed:
            self._complete = True
            self._changed.notify()
        if self._future is None:  # nothing handed to a thread: hash here
            self._future = Future()
            digest = hashlib.sha256(self._view[:self._read] if self._view is not None else b"")
            self._future.set_result(digest.hexdigest())
            return self._future
        self._last_started.wait()
        return self._future

    def matches(self) -> bool:
        """Whether the digest is the ``expected`` one (after :meth:`finish`; waits for the hasher)."""
        return self._future.result() == self._expected

    def _run(self) -> str:
        digest = hashlib.sha256()
        try:
            while True:
                with self._changed:
                    while self._hashed == self._read and not self._complete:
                        self._changed.wait()
                    last = self._complete
                    end = self._read if last else min(self._read, self._hashed + SLICE)
                if last:
                    self._last_started.set()
                digest.update(self._view[self._hashed:end])
                self._hashed = end
                if last:
                    return digest.hexdigest()
        finally:
            self._last_started.set()  # whatever happened, finish() must not wait forever
