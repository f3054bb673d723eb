"""One bad row never fails the batch: when a step's shared forward pass raises, find whose it was.

A kind's hook, a soft prompt or an adapter's tensors can make the forward raise for one row's
sake; the other rows of that step must not pay for it. :func:`isolate` tries the step; when it
raises, it runs each row alone (a probe, on copies: nothing the step keeps is touched). Rows that
fail alone fail with their own error and the step is tried again without them. When every row
passes alone, the fault belongs to the step itself (not to a row): its rows fail together, and the
caller logs it once. Only a failing step pays for the probes.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")


def isolate(rows: Sequence[Row], attempt: Callable[[Sequence[Row]], Result], probe: Callable[[Row], object],
            row_failed: Callable[[Row, Exception], None],
            step_failed: Callable[[Sequence[Row], Exception], None]) -> Result | None:
    """``attempt(rows)``'s result, or None when no row is left to run.

    ``attempt`` must leave no trace when it raises (the engine rolls its cache back), ``probe(row)``
    must run ``row`` alone on copies. ``row_failed(row, exc)`` ends a row whose probe raised;
    ``step_failed(rows, exc)`` ends the rows of a step whose fault no probe reproduced.
    """
    try:
        return attempt(rows)
    except Exception as exc:  # noqa: BLE001 -- whose fault it is is decided below
        fault = exc
    if len(rows) > 1:
        culprits: list[tuple[Row, Exception]] = []
        for row in rows:
            try:
                probe(row)
            except Exception as exc:  # noqa: BLE001 -- this row's own fault
                culprits.append((row, exc))
        if culprits:
            for row, exc in culprits:
                row_failed(row, exc)
            rows = [r for r in rows if all(r is not c for c, _ in culprits)]
            if not rows:
                return None
            try:
                return attempt(rows)
            except Exception as exc:  # noqa: BLE001 -- the rest pass alone and fail together: the step's
                fault = exc
    step_failed(rows, fault)
    return None
