"""SIGTERM and SIGINT for ``adapterhub serve``: the first stops gracefully, a second at once.

The handlers only count: a handler runs between two bytecodes of the main thread, which may hold
the very lock an ``Event.set`` would take, so the waiting side polls instead.
"""

from __future__ import annotations

import signal
import time

POLL_S = 0.1


class StopSignals:
    """Installs handlers for SIGINT and SIGTERM (main thread only) and remembers what arrived."""

    def __init__(self) -> None:
        self.received: list[str] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)

    def wait(self) -> str:
        """Block until the first signal; returns its name."""
        while not self.received:
            time.sleep(POLL_S)
        return self.received[0]

    def again(self) -> bool:
        """Whether a second signal arrived: stop at once."""
        return len(self.received) > 1


def summary(signal_name: str, finished: int, ended: int, grace: float, hurried: bool) -> str:
    """The one line a stopped server prints."""
    if not ended:
        return f"stopped on {signal_name}: {finished} request(s) in flight finished within the {grace:g} s grace"
    cut = "by a second signal" if hurried else f"when the {grace:g} s grace ran out"
    return (f"stopped on {signal_name}: {finished} request(s) in flight finished, "
            f"{ended} ended {cut} (each with a final error)")
