"""(j) How long a request on the exclusive path (``freeze``, ``full``) stalls everyone else.

Small base, full precision. Eight base-model requests of 64 new tokens are decoding when one
``freeze`` request (16 new tokens, the exclusive path: attach, generate alone, detach) arrives,
followed 5 ms later by one more base request of 8 tokens. Measured, medians of 3 rounds: the
late base request's time to its first token and the longest gap between two tokens of a running
request, each over the time the exclusive request takes alone on an idle engine (what "one
request" costs). Ideal: neither waits much longer than one exclusive request; the late one should
not also wait for the running batch to finish first.
"""

from __future__ import annotations

import statistics
import threading
import time

from . import common

ROUNDS = 3


def _freeze_registry(base):
    """A registry with one ``freeze`` adapter (2 training steps: its weights need not be good)."""
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.data import load_dataset
    from adapterhub.manager import PluginManager
    from adapterhub.registry import open_registry
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions
    from transformers import AutoTokenizer

    home = common.OUT / "exclusive_stall"
    store = open_registry(home / "registry")
    if "frozen" not in store.list_tasks():
        tokenizer = AutoTokenizer.from_pretrained(base)
        train, _ = write_split("sentiment", home / "data", n_train=16, n_test=2)
        method = PluginManager(autoload=False).get_method("freeze")
        config = method.make_config({})
        options = TrainOptions(max_steps=2, lr=1e-4, batch_size=8, progress=False, seed=0, run_dir=str(home / "run"))
        result = method.train(load_base(base, "none").model, load_dataset(train, tokenizer, max_length=64), config,
                              options, tokenizer=tokenizer)
        out = save_adapter(method, result.model, config, home / "adapter",
                           base={"name": "small", "fingerprint": fingerprint(base)})
        store.publish("frozen", out)
    return home / "registry"


def _round(engine) -> dict:
    from adapterhub.serve.requests import GenerationRequest

    stamps: list[list[float]] = []

    def running(i: int) -> None:
        seq = engine.submit(GenerationRequest.build(prompt=f"running request {i}", max_new_tokens=64))
        times = []
        for chunk in seq.chunks():
            times.append(time.perf_counter())
            if chunk.result is not None:
                break
        stamps.append(times)

    threads = [threading.Thread(target=running, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while engine.stats()["active"] < 8:
        time.sleep(0.001)
    time.sleep(0.05)  # a few decode steps in
    start = time.perf_counter()
    exclusive = engine.submit(GenerationRequest.build(prompt="slow one", adapters=[("frozen@1", 1.0)], max_new_tokens=16))
    time.sleep(0.005)
    late_start = time.perf_counter()
    late = engine.submit(GenerationRequest.build(prompt="late one", max_new_tokens=8))
    first = next(late.chunks())
    late_ttft = time.perf_counter() - late_start
    exclusive.result()
    exclusive_s = time.perf_counter() - start
    late.result()
    for t in threads:
        t.join()
    gap = max(b - a for times in stamps for a, b in zip(times, times[1:]))
    assert first is not None
    return {"exclusive_s": exclusive_s, "late_ttft_s": late_ttft, "longest_gap_s": gap}


def _alone(engine) -> float:
    from adapterhub.serve.requests import GenerationRequest

    start = time.perf_counter()
    engine.submit(GenerationRequest.build(prompt="slow one", adapters=[("frozen@1", 1.0)], max_new_tokens=16)).result()
    return time.perf_counter() - start


def main() -> dict:
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    common.threads()
    base = common.small_base()
    registry = _freeze_registry(base)
    engine = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=4, max_batch=16)
    try:
        _round(engine)  # warm-up
        rounds = []
        for _ in range(ROUNDS):
            rounds.append({**_round(engine), "alone_s": _alone(engine)})
    finally:
        engine.stop(grace=1)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    one = med["alone_s"]
    print(common.table(["exclusive alone (s)", "late first token (s)", "/ alone", "longest running gap (s)", "/ alone"],
                       [[one, med["late_ttft_s"], med["late_ttft_s"] / one, med["longest_gap_s"],
                         med["longest_gap_s"] / one]]))
    results = {"rounds": rounds, "median": med,
               "targets": [common.verdict("late request's first token / one exclusive request alone",
                                          med["late_ttft_s"] / one, "<=", 1.3)]}
    common.save("exclusive_stall", results)
    return results


if __name__ == "__main__":
    main()
