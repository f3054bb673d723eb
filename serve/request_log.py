"""One request's log line and metrics, the same for both doors (``rpc=...`` for gRPC, ``http=...``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from .status import INTERNAL, Status, status_for

log = logging.getLogger("adapterhub.serve.requests")


def summary(response: Any) -> str:
    """The adapters and token counts of a finished request, for its log line."""
    adapters = getattr(response, "adapters", None)
    if adapters is None or not hasattr(response, "completion_tokens"):
        return ""
    names = ",".join(f"{a.resolved}:{a.weight:g}" for a in adapters) or "base"
    return (f" adapters={names} prompt_tokens={response.prompt_tokens} "
            f"completion_tokens={response.completion_tokens} finish={response.finish_reason}")


class Watch:
    """Started when a request arrives; ``done`` or ``fail`` writes its line and records its metrics."""

    def __init__(self, name: str, metrics: Any, door: str = "rpc"):
        self.name, self.metrics, self.door, self.start = name, metrics, door, time.monotonic()

    def done(self, response: Any) -> None:
        latency = time.monotonic() - self.start
        log.info("%s=%s status=OK latency_ms=%.1f%s", self.door, self.name, latency * 1000, summary(response))
        if self.metrics is not None:
            self.metrics.request(self.name, "OK", latency, response)

    def fail(self, exc: BaseException) -> Status:
        status, latency = status_for(exc), time.monotonic() - self.start
        if status is INTERNAL:
            log.error("%s=%s status=INTERNAL latency_ms=%.1f", self.door, self.name, latency * 1000, exc_info=exc)
        else:
            log.info("%s=%s status=%s latency_ms=%.1f error=%s", self.door, self.name, status.name, latency * 1000, exc)
        if self.metrics is not None:
            self.metrics.request(self.name, status.name, latency, None)
        return status
