"""Garbage collection of an object-store registry that cannot delete a blob a publish is about to use.

A publisher and a gc share no lock server; they coordinate through two kinds of object:

- **Leases.** After hashing its files locally and BEFORE it looks for or uploads any blob, a
  publisher writes ``leases/<uuid>.json`` naming the digests it will reference, then checks that
  no ``gc.lock`` exists (if one does it waits, up to a timeout, then fails naming it). It deletes
  the lease after its manifest is written.
- **gc.lock.** gc creates ``gc.lock`` create-only (so two gcs never run at once), then lists
  leases, THEN manifests, then blobs, and deletes only blobs that no manifest and no fresh lease
  (younger than ``stale_after``, by the store's clock) names. It deletes ``gc.lock`` last.

Why this is safe on a strongly consistent store (S3 since Dec 2020, GCS, Azure, a local disk, all
read-after-write and list-after-write consistent): take a publisher P and a gc G.

1. If P's check saw no ``gc.lock``, G created it after that check, so after P's lease was written;
   G lists leases after creating the lock, so G sees P's lease, unless P already deleted it. P
   deletes its lease only after writing its manifest, and G lists manifests after leases, so then G
   sees the manifest. Either way every digest P references is protected.
2. If P's check saw ``gc.lock``, P waits until it is gone before it looks for any blob, so every
   deletion of that G is over before P decides which blobs exist; a later gc falls under case 1.

Leases are listed before manifests for exactly this reason (the other order lets a manifest appear
and its lease vanish between the two listings). A publisher slower than half the lease lifetime
takes a fresh lease and re-checks its blobs before writing the manifest (``ObjectStore.publish``),
so a stale lease never protects a publish in progress. ``rm`` never deletes blobs, only manifests,
so it needs none of this. gc also deletes stale leases (their publishers died). A ``gc.lock`` older
than ``stale_after`` was left by a gc that died; it is reported with how to remove it
(``adapterhub registry gc --break-lock``), never taken over silently.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from adapterhub.errors import AdapterHubError, IntegrityError, NotFound

from .objectio import Bucket, LostRace

if TYPE_CHECKING:
    from .objectstore import ObjectStore

GC_LOCK = "gc.lock"
LEASES = "leases/"
STALE_AFTER = 3600.0


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _who() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": _now().isoformat(timespec="seconds")}


def _stale_lock_error(bucket: Bucket, age: float, holder: str) -> AdapterHubError:
    return AdapterHubError(
        f"registry {bucket.url}: {GC_LOCK} was written {age:.0f} s ago ({holder}) by a gc that never finished; "
        f"if no gc is running, remove it with `adapterhub registry --registry {bucket.url} gc --break-lock`"
    )


def _holder(bucket: Bucket) -> tuple[float, str, Any] | None:
    """(age in seconds, who holds it, its version) of the gc.lock, or None."""
    got = bucket.get(GC_LOCK)
    if got is None:
        return None
    try:
        info = json.loads(got.data)
        who = f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('time')}"
    except (ValueError, AttributeError):
        who = "unreadable holder"
    return (_now() - got.modified).total_seconds(), who, got.version


class Lease:
    """``with Lease(bucket, digests):`` the digests a publish will reference, safe from gc until exit."""

    def __init__(self, bucket: Bucket, digests: list[str], *, wait: float, stale_after: float = STALE_AFTER):
        self.bucket, self.digests, self.wait, self.stale_after = bucket, digests, wait, stale_after
        self.key = f"{LEASES}{uuid.uuid4().hex}.json"
        self._started = 0.0

    def __enter__(self) -> "Lease":
        self._started = time.monotonic()
        self.bucket.put(self.key, json.dumps({"digests": self.digests, **_who()}).encode())
        try:
            self._wait_for_gc()
        except BaseException:
            self.bucket.delete(self.key)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bucket.delete(self.key)

    def age(self) -> float:
        return time.monotonic() - self._started

    def _wait_for_gc(self) -> None:
        deadline = time.monotonic() + self.wait
        while (held := _holder(self.bucket)) is not None:
            age, who, _ = held
            if age > self.stale_after:
                raise _stale_lock_error(self.bucket, age, who)
            if time.monotonic() > deadline:
                raise AdapterHubError(f"registry {self.bucket.url}: a gc has been running for {age:.0f} s ({who}); "
                                      f"waited {self.wait:g} s to publish, retry when it is done")
            time.sleep(0.1)


def collect(store: "ObjectStore", *, dry_run: bool, stale_after: float = STALE_AFTER,
            break_lock: bool = False) -> dict[str, Any]:
    """Delete unreferenced blobs and stale leases; the report has FileStore.gc's keys plus ``leases_removed``."""
    bucket = store.bucket
    token = uuid.uuid4().hex
    if not dry_run:
        _take_lock(bucket, token, stale_after, break_lock)
    try:
        return _sweep(store, dry_run, stale_after)
    finally:
        if not dry_run:
            got = bucket.get(GC_LOCK)
            if got is not None and token.encode() in got.data:
                bucket.delete(GC_LOCK)


def _take_lock(bucket: Bucket, token: str, stale_after: float, break_lock: bool) -> None:
    body = json.dumps({"token": token, **_who()}).encode()
    if bucket.create(GC_LOCK, body):
        return
    held = _holder(bucket)
    if held is None:  # finished between our create and our read
        if bucket.create(GC_LOCK, body):
            return
        raise AdapterHubError(f"registry {bucket.url}: another gc just started; retry when it is done")
    age, who, version = held
    if age < stale_after:
        raise AdapterHubError(f"registry {bucket.url}: another gc is running ({GC_LOCK} written {age:.0f} s ago, "
                              f"{who}); retry when it is done")
    if not break_lock:
        raise _stale_lock_error(bucket, age, who)
    try:
        bucket.put_if(GC_LOCK, body, version)  # replace exactly the stale lock we looked at
    except LostRace:
        raise AdapterHubError(f"registry {bucket.url}: another gc took the stale {GC_LOCK} first; retry") from None


def _sweep(store: "ObjectStore", dry_run: bool, stale_after: float) -> dict[str, Any]:
    bucket = store.bucket
    report: dict[str, Any] = {"blobs_removed": [], "bytes_freed": 0, "temp_removed": [], "snapshots_removed": [],
                              "leases_removed": []}
    lock = bucket.head(GC_LOCK)
    now = lock.modified if lock is not None else _now()  # the store's clock, as the leases' times are
    protected: set[str] = set()
    for lease in bucket.list(LEASES):  # leases BEFORE manifests: see the module docstring
        if (now - lease.modified).total_seconds() >= stale_after:
            report["leases_removed"].append(f"{bucket.url}/{lease.path}")
            if not dry_run:
                bucket.delete(lease.path)
            continue
        got = bucket.get(lease.path)
        if got is None:
            continue  # its publish finished: its manifest is listed below
        try:
            protected.update(json.loads(got.data)["digests"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"lease {bucket.url}/{lease.path} is unreadable ({exc}); gc refuses to guess "
                                 "what it protects: remove it by hand once no publish is running") from None
    referenced: set[str] = set()
    for task in bucket.folders("tasks/"):
        for version in store.list_versions(task):
            try:
                manifest = store.get_manifest(task, version)  # IntegrityError aborts gc: be safe
            except NotFound:
                continue  # removed since the listing: its blobs are free
            referenced.update(e.sha256 for e in manifest.files.values())
    for blob in bucket.list("blobs/"):
        if blob.name in referenced or blob.name in protected or len(blob.name) != 64:
            continue
        report["blobs_removed"].append(f"{bucket.url}/{blob.path}")
        report["bytes_freed"] += blob.size
        if not dry_run:
            bucket.delete(blob.path)
    return report
