"""Structural invariants behind the engine's speed (not timings, which are bench/'s job).

A KV-cache decode step feeds one token per running row; the number of matmul calls per step does
not grow with the number of distinct adapters; adapter stacks are written once per resident
adapter, not per new mix. One in-process engine on the full-precision tiny base, LoRA adapters
made by random-initialising PEFT's LoRA B (nonzero, so each adapter changes the output).
"""

from __future__ import annotations

import time

import pytest
import torch

N_ADAPTERS = 9


def _random_lora_adapters(base_dir, out, n, *, rank=4, seed=0):
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.manager import PluginManager

    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({"r": rank})
    model = method.attach(load_base(base_dir, "none").model, config)
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        dirs.append(save_adapter(method, model, config, out / f"lora-{i}",
                                 base={"name": "tiny", "fingerprint": fingerprint(base_dir)}))
    return dirs


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_base_dir):
    from adapterhub.base import load_base
    from adapterhub.registry import open_registry
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    root = tmp_path_factory.mktemp("perf")
    store = open_registry(root / "registry")
    for i, directory in enumerate(_random_lora_adapters(tiny_base_dir, root, N_ADAPTERS)):
        store.publish(f"t{i}", directory)
    eng = Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(root / "registry"), capacity=16, max_batch=16)
    yield eng
    eng.stop(grace=1)


def _request(prompt, adapter=None, max_new=6):
    from adapterhub.serve.requests import GenerationRequest

    return GenerationRequest.build(prompt=prompt, adapters=[(adapter, 1.0)] if adapter else [], max_new_tokens=max_new)


class InputShapes:
    """Records ``input_ids`` shapes of every model forward (a real forward pre-hook), and how many of
    their tokens are real (not left padding: the mask's last columns)."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        rows, width = kwargs["input_ids"].shape
        mask = kwargs.get("attention_mask")  # None: a step's one pass, a token per row
        self.shapes.append((rows, width, rows * width if mask is None else int(mask[:, -width:].sum())))

    def close(self):
        self.handle.remove()


def test_decode_feeds_one_token_per_row_and_joins_stay_exact(engine):
    jobs = [("the good day", "t0@1", 40), ("a bad movie, really", "t1@1", 5), ("xy", None, 9), ("dark cold", "t2@1", 7)]
    alone = [engine.submit(_request(p, a, n)).result().token_ids for p, a, n in jobs]
    shapes, cached = InputShapes(engine.model), engine.prefix_cache.hit_tokens
    try:
        stream = engine.submit(_request(*jobs[0])).chunks()
        next(stream)  # the first row is decoding before the others join mid-flight
        later = [engine.submit(_request(*job)) for job in jobs[1:]]
        together = [list(stream)[-1].result.token_ids] + [s.result().token_ids for s in later]
    finally:
        shapes.close()
    assert together == alone, "rows that joined a running batch differ from the same requests alone"
    # each prompt token is fed once (but those the prefix cache kept from the runs alone), and each
    # generated token but a request's last once (one token per row per step: nothing is recomputed)
    prompts = sum(len(engine._tokenize(_request(p, a, n))) for p, a, n in jobs)
    cached = engine.prefix_cache.hit_tokens - cached
    assert sum(fed for _, _, fed in shapes.shapes) == prompts - cached + sum(len(t) - 1 for t in alone)
    assert max(b for b, t, _ in shapes.shapes if t == 1) > 1, "rows were not decoded together"


def _count_matmuls(fn) -> int:
    from torch.overrides import TorchFunctionMode

    names = {"matmul", "mm", "bmm", "einsum", "grouped_mm", "_grouped_mm", "linear", "addmm", "addmm_", "baddbmm",
             "embedding_bag"}

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in names:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    from adapterhub.serve import bgmv

    real = bgmv.lora_add

    def kernel(*args, **kwargs):  # the C kernel is a gathered matmul too, outside torch's function modes
        Count.calls += 1
        return real(*args, **kwargs)

    bgmv.lora_add = kernel
    try:
        with Count():
            fn()
    finally:
        bgmv.lora_add = real
    return Count.calls


def _decode_step_matmuls(engine, refs) -> int:
    from adapterhub.serve.batch_plan import BatchPlan

    entries = [[(engine.cache.acquire(r), 1.0)] if r else [] for r in refs]
    try:
        plan = BatchPlan(entries, engine.pool, engine.device, backend=engine.backend)
        engine.hooks.ensure(plan.modules, plan.input_modules)
        ids = torch.full((len(refs), 1), 65)

        def forward():
            engine.hooks.plan = plan
            try:
                with torch.inference_mode():
                    engine.model(input_ids=ids)
            finally:
                engine.hooks.plan = None

        return _count_matmuls(forward)
    finally:
        for row in entries:
            for entry, _ in row:
                engine.cache.release(entry)


def test_matmul_calls_per_step_do_not_grow_with_distinct_adapters(engine):
    base = _decode_step_matmuls(engine, [None] * 8)
    one = _decode_step_matmuls(engine, ["t0@1"] * 8)  # the shared-adapter path: plain matmuls
    two = _decode_step_matmuls(engine, ["t0@1", "t1@1"] * 4)
    eight = _decode_step_matmuls(engine, [f"t{i}@1" for i in range(8)])
    assert one > base and two > base, "the LoRA hooks added no matmuls: adapters are not applied"
    assert eight == two, f"{eight} matmul calls for 8 distinct adapters vs {two} for two: a loop over adapters"


def test_stacks_written_once_per_adapter_not_per_mix(engine):
    def run(refs):
        for s in [engine.submit(_request("hello", r, 2)) for r in refs]:
            s.result()

    run(["t3@1", "t4@1", "t5@1"])
    writes, rebuilds = engine.pool.writes, engine.pool.rebuilds
    run(["t3@1", "t5@1"])
    run(["t4@1"])
    run(["t5@1", "t4@1", "t3@1", None])
    assert (engine.pool.writes, engine.pool.rebuilds) == (writes, rebuilds), "stacks rebuilt for a known set"
    run(["t8@1", "t3@1"])  # t8: used by no earlier test
    assert engine.pool.writes == writes + 1 and engine.pool.rebuilds == rebuilds


def test_slot_pool_grows_reuses_only_retired_slots_and_never_touches_a_form():
    from adapterhub.serve.slot_pool import SlotPool
    from adapterhub.serving_forms import LoraForm

    def form(rank, value):
        return LoraForm({"m": (torch.full((rank, 4), value), torch.full((3, rank), value))})

    pool = SlotPool("cpu", lora_dtype=torch.float32, slots=2)
    fa = form(2, 1.0)
    pool.admit("a@1", fa)
    pool.admit("b@1", form(2, 2.0))
    stack = pool.lora
    assert stack.rebuilds == 0 and sorted(stack.slot_of.values()) == [1, 2]
    pool.admit("c@1", form(4, 3.0))  # full and nothing retired: grows (also to rank 4)
    At, Bt = stack.tensors["m"]
    a_slot = stack.slot_of["a@1"]
    assert stack.rebuilds >= 1 and At.shape[0] >= 4 and At.shape[2] == 4
    assert torch.equal(At[a_slot, :, :2], torch.ones(4, 2)) and not At[a_slot, :, 2:].any()
    assert torch.equal(Bt[stack.slot_of["c@1"]], torch.full((4, 3), 3.0)) and not At[0].any()
    before = stack.rebuilds
    pool.retire("a@1")  # the cache let a go; a free slot still exists, so d takes that one
    pool.admit("d@1", form(2, 4.0))
    assert stack.rebuilds == before and stack.writes == 4 and stack.slot_of["a@1"] == a_slot
    pool.admit("e@1", form(2, 5.0))  # no free slot: e takes the retired one (a's), not a live one
    assert stack.slot_of["e@1"] == a_slot and "a@1" not in stack.slot_of and stack.rebuilds == before
    assert torch.equal(stack.tensors["m"][0][a_slot, :, :2], torch.full((4, 2), 5.0))
    assert torch.equal(fa.deltas["m"][0], torch.ones(2, 4)) and torch.equal(fa.deltas["m"][1], torch.ones(3, 2))
    assert fa.deltas["m"][0].data_ptr() not in {t.data_ptr() for ts in stack.tensors.values() for t in ts}
    pool.retire("b@1")
    assert not pool.admit("b@1", form(2, 9.0)).positions and stack.writes == 5, "b kept its slot: not rewritten"
    assert torch.equal(Bt[stack.slot_of["b@1"], :2], torch.full((2, 3), 2.0))


def _pool_with(engine, refs, lora_dtype=None):
    """A slot pool of its own (another LoRA dtype, say) holding the forms of ``refs``, read again
    from their checked directories: the engine's cache keeps no tensors."""
    from adapterhub import AdapterFiles
    from adapterhub.serve.slot_pool import SlotPool

    pool = SlotPool(engine.device, lora_dtype=lora_dtype or engine.lora_dtype)
    keys = {ref for item in refs if item for ref, _ in (item if isinstance(item, list) else [(item, 1.0)])}
    for ref in sorted(keys):
        entry = engine.cache.load(ref)
        pool.admit(entry.key, entry.method.serving_form(AdapterFiles.from_directory(entry.directory), engine.model.config))
    return pool


def _logits_with(engine, refs, pool=None, *, overlap=False, backend=None):
    """Logits of one short prompt per row, row i with adapter refs[i] (or a list of (ref, weight)
    to compose), through ``pool`` (default: the engine's); ``overlap`` queues the LoRA on the
    kernel's worker thread, ``backend`` names a LoRA backend (default: the engine's)."""
    from adapterhub.serve import lora_backends
    from adapterhub.serve.batch_plan import BatchPlan

    entries = [[(engine.cache.acquire(r), w) for r, w in (ref if isinstance(ref, list) else [(ref, 1.0)])] if ref else []
               for ref in refs]
    plan = None
    try:
        chosen = lora_backends.select(engine.device, backend or engine.backend.name, overlap=overlap)
        plan = BatchPlan(entries, pool or engine.pool, engine.device, backend=chosen)
        engine.hooks.ensure(plan.modules, plan.input_modules)
        engine.hooks.plan = plan
        with torch.inference_mode():
            out = engine.model(input_ids=torch.tensor([[72, 105, 33]] * len(refs))).logits
        lora = [p for p in plan.parts if hasattr(p, "shared_slot")]
        return out, bool(lora) and lora[0].shared_slot is not None
    finally:
        engine.hooks.plan = None
        if plan is not None:
            plan.drain()
        for row in entries:
            for entry, _ in row:
                engine.cache.release(entry)


def test_shared_adapter_fast_path_equals_the_gathered_path(engine):
    """Rows of one adapter give the same logits whether the batch takes the dense path (every row
    the same adapter) or the gathered one (mixed with another adapter): exactly, in float32."""
    stacks = _pool_with(engine, ["t6@1", "t7@1"], torch.float32)
    shared, dense = _logits_with(engine, ["t6@1"] * 2, stacks)
    mixed, gathered = _logits_with(engine, ["t6@1", "t6@1", "t7@1"], stacks)
    assert dense and not gathered
    torch.testing.assert_close(shared, mixed[:2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[2], mixed[0], atol=1e-3), "t7 should change the output differently from t6"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_queued_beside_the_base_layers_gives_the_in_line_logits(engine, dtype, monkeypatch):
    """With a core to spare, a mixed batch's LoRA runs on the kernel's worker thread while each
    base layer runs, and is added after it: the logits are the in-line path's (the delta is summed
    from zero, then added: one rounding more), composed and weighted rows included."""
    from adapterhub.serve import bgmv

    queued = []
    real = bgmv.lora_add_queued
    monkeypatch.setattr(bgmv, "lora_add_queued", lambda *a: queued.append(a[4].shape) or real(*a))
    refs = ["t6@1", "t7@1", None, [("t6@1", 0.5), ("t8@1", 1.5)]]
    stacks = _pool_with(engine, refs, dtype)
    in_line, _ = _logits_with(engine, refs, stacks)
    assert not queued
    overlapped, _ = _logits_with(engine, refs, stacks, overlap=True)
    assert len(queued) == 2 * len(stacks.lora.tensors), "every adapted module, once per slot position (2: composed row)"
    assert bgmv.lora_busy(True) == 1 and bgmv.lora_busy(False) == 0, "the pass ended its busy spell (drain)"
    torch.testing.assert_close(overlapped, in_line, rtol=1e-5, atol=1e-5)
    shared, dense = _logits_with(engine, ["t6@1"] * 2, stacks, overlap=True)
    assert dense and len(queued) == 2 * len(stacks.lora.tensors), "one adapter for every row: plain matmuls, in line"


def test_while_an_adapter_loads_a_pass_adds_its_lora_in_line(engine, monkeypatch):
    """A load wants both cores for ~4 ms (read and hash on two threads): a pass running meanwhile
    queues nothing on the worker and gives the same logits in line."""
    from adapterhub.serve import bgmv

    queued = []
    real = bgmv.lora_add_queued
    monkeypatch.setattr(bgmv, "lora_add_queued", lambda *a: queued.append(1) or real(*a))
    refs = ["t6@1", "t7@1", None]
    stacks = _pool_with(engine, refs)
    in_line, _ = _logits_with(engine, refs, stacks)
    with bgmv.yielding_cores():
        assert bgmv.cores_wanted()
        during_load, _ = _logits_with(engine, refs, stacks, overlap=True)
    assert not queued and not bgmv.cores_wanted()
    torch.testing.assert_close(during_load, in_line, rtol=0, atol=0)
    _logits_with(engine, refs, stacks, overlap=True)
    assert queued, "after the load the pass queues again"


def test_a_forward_pass_that_raises_still_waits_for_its_jobs_and_ends_its_busy_spell(engine):
    """The engine drains a pass in ``finally``: queued jobs are waited for (they write tensors the
    pass owns) and the worker stops spinning, whatever the model raised."""
    from adapterhub.serve import bgmv
    from adapterhub.serve.batch_plan import BatchPlan
    from adapterhub.serve.lora_backends.cpu_c import CLora

    refs = ["t6@1", "t7@1"]
    entries = [[(engine.cache.acquire(r), 1.0)] for r in refs]
    plan = BatchPlan(entries, engine.pool, engine.device, backend=CLora(overlap=True))
    assert plan.input_modules

    def fail(*_):
        raise RuntimeError("a layer failed")

    handle = engine.model.model.layers[-1].register_forward_hook(fail)
    ids = torch.tensor([[72, 105, 33]] * len(refs))
    try:
        with pytest.raises(RuntimeError, match="a layer failed"):
            engine.passes.forward(plan, ids, torch.ones_like(ids), torch.arange(3).expand(len(refs), 3), None)
    finally:
        handle.remove()
        for row in entries:
            engine.cache.release(row[0][0])
    assert not any(getattr(p, "_pending", None) for p in plan.parts)
    assert bgmv.lora_busy(True) == 1 and bgmv.lora_busy(False) == 0


def test_an_engine_with_lora_overlap_serves_the_same_tokens(engine, tiny_base_dir):
    from adapterhub.base import load_base
    from adapterhub.serve.engine import Engine

    overlapping = Engine.create(load_base(tiny_base_dir, "none"), engine.cache.source, capacity=16, max_batch=16,
                                lora_overlap=True)
    try:
        assert overlapping.lora_overlap
        jobs = [(f"prompt {i}", f"t{i % 5}@1" if i % 4 else None, 8) for i in range(10)]
        expected = [s.result().token_ids for s in [engine.submit(_request(*j)) for j in jobs]]
        assert [s.result().token_ids for s in [overlapping.submit(_request(*j)) for j in jobs]] == expected
    finally:
        overlapping.stop(grace=1)


def test_half_precision_stacks_keep_each_adapters_effect_within_one_percent(engine):
    refs = ["t6@1", "t7@1", None, "t6@1"]
    base, _ = _logits_with(engine, [None] * len(refs))
    exact, _ = _logits_with(engine, refs, _pool_with(engine, refs, torch.float32))
    assert engine.pool.lora.dtype == torch.float32, "the default follows the base's compute dtype"
    half, _ = _logits_with(engine, refs, _pool_with(engine, refs, torch.float16))
    effect = (exact - base).norm()
    assert effect > 1.0, "the adapters change nothing: the comparison would be empty"
    assert (half - exact).norm() < 0.01 * effect, f"half precision moved logits by {(half - exact).norm() / effect:.2%} of the effect"
    assert torch.equal(half[2], base[2]), "a row without adapter must not see the stacks at all"


def test_unary_requests_skip_per_token_events_and_match_streamed_ones(engine):
    jobs = [("the good day", "t0@1", []), ("a bad movie", None, ["e"]), ("xy", "t1@1", ["zzz"])]
    for prompt, ref, stop in jobs:
        from adapterhub.serve.requests import GenerationRequest

        request = GenerationRequest.build(prompt=prompt, adapters=[(ref, 1.0)] if ref else [], max_new_tokens=12, stop=stop)
        streamed = list(engine.submit(request).chunks())
        unary = list(engine.submit(request, stream=False).chunks())
        assert len(unary) == 1, "a unary request should get one event, not one per token"
        assert unary[0].result == streamed[-1].result
        assert unary[0].text == unary[0].result.text == "".join(c.text for c in streamed)
        assert unary[0].token_ids == unary[0].result.token_ids == [t for c in streamed for t in c.token_ids]


def test_a_burst_from_idle_is_prefilled_as_one_batch(engine):
    window, gap = engine.admission_window, engine.admission_gap
    engine.admission_window, engine.admission_gap = 5.0, 0.25  # generous: CI machines stall
    shapes = InputShapes(engine.model)
    try:
        seqs = [engine.submit(_request(f"burst {i}", f"t{i % 3}@1", 3), stream=False) for i in range(6)]
        [s.result() for s in seqs]
    finally:
        shapes.close()
        engine.admission_window, engine.admission_gap = window, gap
    assert shapes.shapes[0][0] == 6, f"the burst was split: forwards {shapes.shapes}"
    assert len(shapes.shapes) == 3, f"one prefill and two decode steps expected, got {shapes.shapes}"


HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}


def _reads_per_step(target, work) -> list[tuple[bool, int]]:
    """(had a prefill, host reads of tensors) for every scheduler step of ``target`` while ``work``
    runs: what becomes a device synchronisation when the engine runs on a GPU."""
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                self.count += 1
            return func(*args, **(kwargs or {}))

    seen, real = [], target._step

    def counted():
        before = len(target._batch.rows) if target._batch is not None else 0
        with target._cond:
            prefill = len(target._active) > before
        with Reads() as reads:
            real()
        seen.append((prefill, reads.count))

    target._step = counted
    try:
        work()
    finally:
        del target._step
    return seen


def test_a_decode_step_reads_the_device_once(engine, tiny_base_dir):
    """On the device path (the torch backend, as on a GPU), a decode step of a mixed batch (LoRA
    rows, a composition, the base) reads from the device once: the sampled tokens. The base
    model's own forward reads are counted apart and allowed for."""
    from adapterhub.base import load_base
    from adapterhub.serve.engine import Engine

    device_path = Engine.create(load_base(tiny_base_dir, "none"), engine.cache.source, capacity=16, max_batch=16,
                                lora_backend="torch")
    try:
        refs = ["t0@1", "t1@1", None, "t2@1"]
        seqs = []
        steps = _reads_per_step(device_path, lambda: seqs.extend(
            [device_path.submit(_request(f"prompt {i}", r, 12)) for i, r in enumerate(refs)]) or
            [s.result() for s in seqs])
        model = device_path.model
        ids = torch.tensor([[65]] * len(refs))
        baseline = _reads_per_step_of_forward(model, ids)
    finally:
        device_path.stop(grace=1)
    decode = [n for prefill, n in steps if not prefill]
    assert len(decode) >= 8, steps
    print(f"host reads per decode step: {decode}; a bare forward: {baseline}")
    assert max(decode) <= baseline + 1, f"decode steps read the device {decode} times; the bare forward {baseline}"


def _reads_per_step_of_forward(model, ids) -> int:
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    with Reads(), torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return Reads.count
