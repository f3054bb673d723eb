"""The adapter cache: at most K resident adapters, LRU, pinnable, loaded off the engine lock.

Loading (one read of each file, its sha256 check in a background thread meanwhile, the method's
serving form from those bytes) runs in the calling request thread while other requests keep
decoding; the entry is published only once every check passed. Concurrent requests for the same
version wait for one load. An adapter in use by running requests is never evicted from under them:
eviction skips it, and if every resident adapter is pinned or busy the cache goes over capacity
until one is released (logged), rather than failing the request.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Callable, ContextManager

from adapterhub.errors import AdapterHubError, ConfigError, LimitExceeded, NotFound, PluginError
from adapterhub.manager import get_manager
from adapterhub.metadata import check_base
from adapterhub.objective import CAUSAL_LM

from .adapter_source import AdapterSource, AdapterVersion
from .slot_pool import SlotPool

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class LoadedAdapter:
    """A resident adapter: its version, method, directory and how it is served (None: the slow path).

    ``served`` holds no tensors of a stacked kind: those live in the engine's slot pool only.
    """

    version: AdapterVersion
    method: Any
    checked_directory: Callable[[], Path] = dataclasses.field(repr=False)  # see AdapterFiles.directory_later
    served: Any
    pinned: bool = False
    in_use: int = 0

    @property
    def directory(self) -> Path:
        """Where its files lie, checked against the manifest when first asked for (the slow path
        reads them there; a load with a serving form never does, and skips the check)."""
        return self.checked_directory()

    @functools.cached_property
    def key(self) -> str:  # read per row per step: computed once
        return self.version.ref

    @property
    def form_kind(self) -> str:
        return self.served.kind.form_type.__name__ if self.served is not None else ""


def check_generates(version: AdapterVersion, ref: str) -> None:
    """Refuse a reward model (``--objective reward``: a score head, recorded in its lineage) by name:
    it scores answers, and loading it for generation would fail somewhere less clear."""
    training = getattr(version.manifest, "training", None) or {}
    objective = training.get("objective") or {}
    if objective.get("head", CAUSAL_LM) != CAUSAL_LM:
        where = ref if ref == version.ref else f"{ref} ({version.ref})"
        raise ConfigError(f"{where} is a reward model (objective {objective.get('name')}): it scores "
                          f"answers and does not generate; score with `adapterhub score {version.ref} --data FILE`")


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource,
        *,
        capacity: int,
        base_fingerprint: str,
        base_config: Any,
        pool: SlotPool | None = None,
        loading: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
        metrics: Any = None,
    ):
        """``pool``: the engine's slot pool (admit/retire/forget): a load copies its form into the
        device slots itself, while the hash check still runs, instead of the scheduler between steps
        (None: a CPU pool of its own, for a cache used alone). ``loading``: held around each load,
        the engine's LoRA backend's guard (:meth:`LoraBackend.loading`)."""
        if capacity < 1:
            raise LimitExceeded(f"--max-adapters {capacity} must be at least 1")
        self.source = source
        self.capacity = capacity
        self.base_fingerprint = base_fingerprint
        self.base_config = base_config
        self.metrics = metrics
        self.pool = pool if pool is not None else SlotPool("cpu")
        self.loading = loading
        self._lock = threading.Lock()
        self._holds: collections.Counter[str] = collections.Counter()  # key -> requests holding it
        self._resident: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._load_errors: dict[str, BaseException] = {}

    # -- lookups ---------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        version = self.source.resolve(ref)
        check_base(version, self.base_fingerprint, where=f"{ref} ({version.ref})", base_name="this server's base",
                   advice="send it to a server with that base, or retrain the adapter on this one")
        check_generates(version, ref)
        return version

    def acquire(self, ref: str) -> LoadedAdapter:
        """Resolve ``ref`` now, load it if needed, and mark it in use until :meth:`release`."""
        version = self.resolve(ref)
        entry = self._get_or_load(version)
        with self._lock:
            entry.in_use += 1
            self._holds[entry.key] += 1
        return entry

    def release(self, entry: LoadedAdapter) -> None:
        with self._lock:
            entry.in_use = max(0, entry.in_use - 1)
            self._holds[entry.key] -= 1
            if self._holds[entry.key] <= 0:
                del self._holds[entry.key]
                if entry.key not in self._resident:  # unloaded while running: now it is let go
                    self.pool.retire(entry.key)
            self._evict_locked()

    def in_use(self, key: str) -> bool:
        """Whether any request holds version ``key`` (resident or not): its stack slot must stay."""
        return key in self._holds

    def _get_or_load(self, version: AdapterVersion) -> LoadedAdapter:
        key = version.ref
        while True:
            with self._lock:
                entry = self._resident.get(key)
                if entry is not None:
                    self._resident.move_to_end(key)
                    self._count("hits")
                    return entry
                event = self._loading.get(key)
                if event is None:
                    event = self._loading[key] = threading.Event()
                    break
            event.wait()  # another thread loads it; then look again
            with self._lock:
                error = self._load_errors.get(key)
            if error is not None and key not in self._resident:
                raise error
        self._count("misses")
        try:
            entry = self._load(version)
        except BaseException as exc:
            with self._lock:
                self._load_errors[key] = exc
                del self._loading[key]
            event.set()
            raise
        with self._lock:
            self._resident[key] = entry
            self._load_errors.pop(key, None)
            del self._loading[key]
            self._evict_locked(keep=key)
        event.set()
        return entry

    def _load(self, version: AdapterVersion) -> LoadedAdapter:
        with self.loading():  # tells the engine's LoRA backend that a load wants the cores
            return self._load_files(version)

    def _load_files(self, version: AdapterVersion) -> LoadedAdapter:
        method = get_manager().get_method(version.method)
        files = self.source.read(version)  # each file read once; their sha256 checks run meanwhile
        served = None
        try:
            # the method's declared capability decides: only mixed-batch methods build a serving form
            form = self._form(method, files, version) if method.capabilities.mixed_batch else None
            if form is None and method.capabilities.mixed_batch:
                log.warning("%s: method %s declares mixed_batch but gave no serving form; using the slow path",
                            version.ref, method.name)
            served = self._admit(method, version, form) if form is not None else None  # overlaps the hash check
            files.check()
        except BaseException:
            if served is not None and not self.in_use(version.ref):
                self.pool.forget(version.ref)
            files.check()  # bad bytes: IntegrityError, over whatever error they caused; nothing is kept
            raise
        log.info("loaded adapter %s (method %s, %s)", version.ref, method.name,
                 served.kind.name if served is not None else "slow path")
        return LoadedAdapter(version=version, method=method, checked_directory=files.directory_later(), served=served)

    def _admit(self, method: Any, version: AdapterVersion, form: Any) -> Any:
        try:
            return self.pool.admit(version.ref, form)
        except PluginError as exc:
            raise PluginError(f"method plugin {method.name!r} ({getattr(method, 'origin', '?')}), adapter "
                              f"{version.ref}: {exc}") from None

    def _form(self, method: Any, files: Any, version: AdapterVersion) -> Any:
        try:
            return method.serving_form(files, self.base_config)
        except AdapterHubError:
            raise
        except Exception as exc:  # a plugin bug fails only the requests that use this adapter
            raise PluginError(
                f"method plugin {method.name!r} ({getattr(method, 'origin', '?')}) failed to prepare adapter "
                f"{version.ref} for serving: {type(exc).__name__}: {exc}; fix or update the plugin") from exc

    def _evict_locked(self, keep: str | None = None) -> None:
        while len(self._resident) > self.capacity:
            victim = next(
                (k for k, e in self._resident.items() if k != keep and not e.pinned and e.in_use == 0), None
            )
            if victim is None:
                log.warning("adapter cache over capacity (%d > %d): every adapter is pinned or in use",
                            len(self._resident), self.capacity)
                return
            del self._resident[victim]
            if victim not in self._holds:  # else the last request to let go retires it
                self.pool.retire(victim)
            self._count("evictions")
            log.info("evicted adapter %s", victim)

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_event(what)

    # -- admin -----------------------------------------------------------------------------------

    def load(self, ref: str) -> LoadedAdapter:
        return self._get_or_load(self.resolve(ref))

    def unload(self, ref: str) -> tuple[str, bool]:
        """Drop a version from the cache (running requests keep their reference to it)."""
        version = self.source.resolve(ref)
        with self._lock:
            entry = self._resident.get(version.ref)
            if entry is None:
                return version.ref, False
            if entry.pinned:
                raise LimitExceeded(f"adapter {version.ref} is pinned; unpin it before unloading")
            del self._resident[version.ref]
            if version.ref not in self._holds:
                self.pool.retire(version.ref)
            return version.ref, True

    def set_pinned(self, ref: str, pinned: bool) -> LoadedAdapter:
        entry = self._get_or_load(self.resolve(ref)) if pinned else self._resident_entry(ref)
        with self._lock:
            entry.pinned = pinned
            self._evict_locked()
        return entry

    def _resident_entry(self, ref: str) -> LoadedAdapter:
        version = self.source.resolve(ref)
        with self._lock:
            entry = self._resident.get(version.ref)
        if entry is None:
            raise NotFound(f"adapter {version.ref} is not resident on this server; nothing to unpin")
        return entry

    def snapshot(self) -> list[LoadedAdapter]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident.values())
