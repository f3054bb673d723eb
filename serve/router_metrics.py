"""The gauges Kubernetes routers read from a model server's ``/metrics``, computed at scrape time.

Gateway API Inference Extension's endpoint picker (and llm-d's), vLLM production-stack and AIBrix
pick a replica for a request by scraping vLLM's metric names: queue depth, running requests, KV
cache usage, and ``vllm:lora_requests_info`` (which adapters are running and waiting). This
collector answers them from the engine's own lists and the adapter cache at each scrape, so a
value can never drift from what the scheduler holds (nothing is incremented or decremented).

Choices where adapterhub differs from vLLM:

- An adapter is listed by the name its request gave (``sentiment@prod``, as in the ``model``
  field), because a router matches the next request's ``model`` against these names; each term of
  a composition is listed on its own.
- ``max_lora`` is the adapter cache's capacity (``--max-adapters``): a mixed batch serves any
  resident adapter, so that is the number of adapters a replica holds ready at once.
- KV cache usage is the key/value positions the running requests hold (prefix, prompt and the
  tokens so far) over the most the engine would hold, ``--max-batch`` x the context length: this
  engine grows its cache per batch instead of preallocating blocks. Both vLLM's current name
  (``vllm:kv_cache_usage_perc``) and the older one (``vllm:gpu_cache_usage_perc``) are exported.
- ``adapterhub_adapter_resident`` has one sample per resident adapter, labelled with its immutable
  version and the sha256 of its manifest (which names every file's sha256), so a router or an
  operator can tell two replicas holding ``task@3`` hold the same bytes.
- Prefix caching is reported as vLLM v1 reports it, in tokens: ``vllm:prefix_cache_queries_total``
  (input tokens looked up) and ``vllm:prefix_cache_hits_total`` (those served from the cache), so
  hit rate = hits / queries over any window; ``adapterhub_prefix_cache_bytes`` is what it holds.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LORA_INFO = "vllm:lora_requests_info"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
RESIDENT = "adapterhub_adapter_resident"
PREFIX_QUERIES = "vllm:prefix_cache_queries"  # counters: the exposition adds _total
PREFIX_HITS = "vllm:prefix_cache_hits"
PREFIX_BYTES = "adapterhub_prefix_cache_bytes"


def manifest_digest(version: Any) -> str:
    """``sha256:<hex>`` of the version's manifest in its canonical form ("" when none was read)."""
    manifest = getattr(version, "manifest", None)
    if manifest is None:
        return ""
    return "sha256:" + hashlib.sha256(manifest.to_json().encode()).hexdigest()


def adapter_names(sequences: Iterable[Any]) -> list[str]:
    """The adapters these requests named, each once, in order of first appearance (vLLM's order)."""
    names: dict[str, None] = {}
    for seq in sequences:
        for adapter in seq.resolved:
            names.setdefault(adapter.requested, None)
    return list(names)


class RouterMetrics:
    """A prometheus_client collector over one engine; ``model_name`` labels the request gauges as
    vLLM labels them (the served model name)."""

    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self._digests: dict[str, str] = {}  # resident version -> digest (versions are immutable)

    def describe(self) -> Iterator[Any]:
        """The families without samples: registering checks names against the rest of the registry
        without reading the engine."""
        return self._families(empty=True)

    def collect(self) -> Iterator[Any]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Any]:
        engine, labels = self.engine, ["model_name"]
        lora = GaugeMetricFamily(LORA_INFO, "Running stats on LoRA requests (value: the time of the scrape).",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        running = GaugeMetricFamily(RUNNING, "Number of requests in the running batch.", labels=labels)
        waiting = GaugeMetricFamily(WAITING, "Number of requests waiting to join the batch.", labels=labels)
        kv = GaugeMetricFamily(KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", labels=labels)
        kv_old = GaugeMetricFamily(KV_USAGE_OLD, "KV-cache usage (vLLM's older name). 1 means 100 percent usage.",
                                   labels=labels)
        resident = GaugeMetricFamily(RESIDENT, "1 for each adapter version resident in the adapter cache.",
                                     labels=["adapter", "digest", "method"])
        queries = CounterMetricFamily(PREFIX_QUERIES, "Prefix cache queries, in input tokens looked up.", labels=labels)
        hits = CounterMetricFamily(PREFIX_HITS, "Prefix cache hits, in input tokens served from the cache.", labels=labels)
        held = GaugeMetricFamily(PREFIX_BYTES, "Bytes of keys/values the prefix cache holds.", labels=labels)
        if not empty:
            rows, queued = engine.in_flight()
            lora.add_metric([str(engine.cache.capacity), ",".join(adapter_names(rows)), ",".join(adapter_names(queued))],
                            time.time())
            running.add_metric([self.model_name], len(rows))
            waiting.add_metric([self.model_name], len(queued))
            usage = kv_usage(rows, engine.max_batch, engine.limits.context_length)
            kv.add_metric([self.model_name], usage)
            kv_old.add_metric([self.model_name], usage)
            entries = engine.cache.snapshot()
            self._digests = {e.key: self._digests.get(e.key) or manifest_digest(e.version) for e in entries}
            for entry in entries:
                resident.add_metric([entry.key, self._digests[entry.key], entry.method.name], 1)
            cache = engine.prefix_cache
            queries.add_metric([self.model_name], cache.queried_tokens)
            hits.add_metric([self.model_name], cache.hit_tokens)
            held.add_metric([self.model_name], cache.bytes)
        return iter([lora, running, waiting, kv, kv_old, resident, queries, hits, held])


def kv_usage(rows: Iterable[Any], max_batch: int, context_length: int) -> float:
    """Key/value positions the running rows hold over ``max_batch`` x ``context_length``."""
    held = sum(seq.prefix_len + len(seq.prompt_ids) + len(seq.generated) for seq in rows)
    return min(1.0, held / max(1, max_batch * context_length))
