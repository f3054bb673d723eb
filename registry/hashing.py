"""sha256 of a file while it is read, on another thread, without stalling the reader's Python.

hashlib releases the GIL while it hashes more than 2 KiB, so a hasher thread and the reading thread
use both cores. The catch is the GIL *between* two ``update`` calls: a hasher that wants it back
while the reader runs plain Python waits for CPython's switch interval (5 ms), longer than the whole
hash of a LoRA adapter (seen: a 2.6 ms hash finishing 5.5 ms after the read began). So the hasher
hashes what has been read so far in slices while the read goes on (the reader sits in ``readinto``
then, without the GIL), and :meth:`ShaWhileReading.finish` returns once the hasher is inside its
last ``update``, which covers everything left: from then on it needs the GIL only to return the
digest, by which time the reader waits for it.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Executor, Future

SLICE = 256 << 10  # bytes per update while the read goes on: bounds the wait in finish() (~0.2 ms)


class ShaWhileReading:
    """The sha256 of one buffer being filled front to back.

    The reader calls :meth:`advanced` after each piece it read and :meth:`finish` once the read is
    over (complete or not); ``finish`` returns a future of the hex digest. Without an executor, or
    for a buffer of one slice or less, ``finish`` hashes in the calling thread.
    """

    def __init__(self, executor: Executor | None, size: int):
        self._executor = executor if size > SLICE else None
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
