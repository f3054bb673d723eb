"""The C kernel for LoRA over a mixed batch (serve/_bgmv.c via serve/bgmv.py): exact against a
float64 reference on every instruction set this CPU runs, and refusing what it cannot take."""

from __future__ import annotations

import re

import pytest
import torch

from adapterhub.serve import bgmv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_the_kernel_is_built_here():
    """The install builds it (a C compiler is on every dev and CI machine): a silent fallback to
    the plain-torch backend would pass every other test and lose the speed."""
    assert bgmv.available("cpu"), "adapterhub.serve._bgmv was not built; `make venv` needs a C compiler"
    assert bgmv.isas()[0] == "portable"
    assert bgmv.describe("cpu").startswith("C kernel")
    assert not bgmv.available("meta") and "meta" in bgmv.describe("meta")


def _reference(x, A, B, slots, weights, y0):
    delta = torch.einsum("ti,tir,tro->to", x.double(), A[slots].double(), B[slots].double())
    w = torch.ones(len(slots), dtype=torch.float64) if weights is None else weights.double()
    use = (slots > 0).double()  # slot 0 is "no adapter": skipped, whatever it holds
    return y0.double() + (w * use)[:, None] * delta


@pytest.mark.parametrize("isa", bgmv.isas())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,rank,out,tokens", [(512, 16, 1408, 9), (37, 5, 19, 11), (64, 24, 40, 16), (3, 33, 17, 5)])
def test_matches_float64_reference(isa, dtype, width, rank, out, tokens):
    gen = torch.Generator().manual_seed(width * rank + out)
    A = torch.randn(6, width, rank, generator=gen).to(dtype)
    B = torch.randn(6, rank, out, generator=gen).to(dtype)
    A[0], B[0] = 1.0, 1.0  # slot 0 must not be read into the result
    x = torch.randn(tokens, width, generator=gen)
    slots = torch.randint(0, 6, (tokens,), generator=gen)
    slots[:4] = 3  # a group of tokens sharing one adapter
    for weights in (None, torch.rand(tokens, generator=gen) + 0.5):
        y = torch.randn(tokens, out, generator=gen)
        expected = _reference(x, A, B, slots, weights, y)
        bgmv.lora_add(x, A, B, bgmv.Tokens(slots, weights, 6), y, isa=isa, threads=1)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_strided_output_rows_and_worker_threads_give_the_same_result():
    gen = torch.Generator().manual_seed(7)
    A, B = torch.randn(9, 64, 16, generator=gen), torch.randn(9, 16, 48, generator=gen)
    x, slots = torch.randn(64, 64, generator=gen), torch.randint(1, 9, (64,), generator=gen)
    tokens = bgmv.Tokens(slots, None, 9)
    wide = torch.zeros(64, 100)
    bgmv.lora_add(x, A, B, tokens, wide[:, 10:58], threads=1)  # a view with row stride 100
    assert not wide[:, :10].any() and not wide[:, 58:].any(), "wrote outside the view"
    split = torch.zeros(64, 48)
    bgmv.lora_add(x, A, B, tokens, split, threads=4)
    assert torch.equal(split, wide[:, 10:58]), "splitting tokens over threads changed the result"


@pytest.mark.parametrize("isa", bgmv.isas())
def test_every_finite_float16_value_converts_exactly(isa):
    """The portable float16 conversion moves bit fields by hand: each of the 63,488 finite values
    (subnormals included) must come out as torch's conversion gives it."""
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = torch.where(values.isfinite(), values, torch.zeros_like(values)).reshape(1, 4096, 16)
    A, B = torch.cat([torch.zeros_like(finite), finite]), torch.eye(16, dtype=torch.float16).expand(2, 16, 16).contiguous()
    x = torch.eye(4096)  # token i reads row i of A: h = A[i]; y = h @ I
    y = torch.zeros(4096, 16)
    bgmv.lora_add(x, A, B, bgmv.Tokens(torch.ones(4096, dtype=torch.long), None, 2), y, isa=isa, threads=1)
    assert torch.equal(y, finite[0].float())


def test_tokens_skip_unadapted_rows_and_keep_a_prompt_together():
    slots = torch.tensor([2, 2, 0, 1, 1, 2, 0])
    tokens = bgmv.Tokens(slots, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]), 3)
    assert tokens.order.tolist() == [4, 0, 1, 5], "slot-0 and weight-0 tokens need no work; the rest sorted by slot"


@pytest.mark.parametrize("case,message", [
    ("slot out of range", "slots outside [0, 4)"),
    ("negative slot", "slots outside [0, 4)"),
    ("wrong width", "do not fit"),
    ("float64 stacks", "do not fit"),
    ("non-contiguous stack", "do not fit"),
    ("half-precision x", "do not fit"),
    ("rank over the limit", "do not fit"),
])
def test_bad_inputs_are_refused_before_the_c_code(case, message):
    A, B = torch.randn(4, 8, 4), torch.randn(4, 4, 8)
    x, y, slots = torch.randn(3, 8), torch.zeros(3, 8), torch.tensor([1, 2, 3])
    if case == "slot out of range":
        slots = torch.tensor([1, 2, 4])
    elif case == "negative slot":
        slots = torch.tensor([1, -1, 3])
    elif case == "wrong width":
        x = torch.randn(3, 9)
    elif case == "float64 stacks":
        A, B = A.double(), B.double()
    elif case == "non-contiguous stack":
        A = torch.randn(4, 4, 8).transpose(1, 2)
    elif case == "half-precision x":
        x = x.half()
    elif case == "rank over the limit":
        A, B = torch.randn(4, 8, bgmv.MAX_RANK + 1), torch.randn(4, bgmv.MAX_RANK + 1, 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        bgmv.lora_add(x, A, B, bgmv.Tokens(slots, None, 4), y)
    assert not y.any(), "a refused call must write nothing"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_lora_slot_write_is_the_scaled_transpose_rounded_once(dtype, monkeypatch):
    """The slot write transposes the file's A and B into the stacks, B times its scale, converting
    once: exactly what ``(scale * B).T.to(dtype)`` gives, by the C path and by PyTorch's path alike."""
    from adapterhub.serve.kinds import copy_scaled, lora
    from adapterhub.serve.slot_pool import SlotPool
    from adapterhub.serving_forms import LoraForm

    gen = torch.Generator().manual_seed(3)
    deltas = {"m": (torch.randn(5, 40, generator=gen), torch.randn(24, 5, generator=gen)),
              "n": (torch.randn(3, 24, generator=gen), torch.randn(40, 3, generator=gen))}
    scales = {"m": 7 / 5, "n": 0.3}
    results = []
    for c_path in (True, False):
        stacks = SlotPool(slots=2, lora_dtype=dtype)
        if not c_path:
            monkeypatch.setattr(lora, "_copy_lora", copy_scaled)
        form = LoraForm({m: (a.clone(), b.clone()) for m, (a, b) in deltas.items()}, dict(scales))
        stacks.admit("x@1", form)
        slot = stacks.lora.slot_of["x@1"]
        for m, (a, b) in deltas.items():
            At, Bt = stacks.lora.tensors[m]
            rank = a.shape[0]
            assert torch.equal(At[slot, :, :rank], a.T.to(dtype)), (m, c_path)
            assert torch.equal(Bt[slot, :rank], (b * scales[m]).T.to(dtype)), (m, c_path)
            assert not At[slot, :, rank:].any(), "rank padding must stay zero"
        assert form.scales == scales and all(torch.equal(form.deltas[m][1], b) for m, (_, b) in deltas.items()), \
            "the slot write must leave the plugin's form as it was"
        results.append(stacks.lora.tensors)
    assert all(torch.equal(x, y) for m in deltas for x, y in zip(results[0][m], results[1][m]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(16, 512), (512, 16), (3, 5), (17, 33), (1, 1), (40, 7)])
def test_every_instruction_set_writes_the_same_slot_bits(dtype, rows, cols):
    """The slot write's transposing copy (AVX-512 in registers, or plain C blocks) rounds alike on
    every instruction set, edges, nan, inf, subnormals and overflow included, and touches nothing
    outside its region."""
    from adapterhub.serve import _bgmv

    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    src = torch.randn(rows, cols, generator=gen) * 10
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, 65520.0, -0.0, 3.0e38])
    src.view(-1)[::5] = special[torch.arange(src.view(-1)[::5].numel()) % len(special)]
    written = []
    for isa in bgmv.isas():
        dst = torch.full((cols + 2, rows + 3), 7, dtype=dtype)
        _bgmv.transpose_into([(src.data_ptr(), dst.data_ptr(), rows, cols, rows + 3, 0.37)], bgmv.DTYPES[dtype],
                             bgmv.isas().index(isa))
        assert (dst[cols:] == 7).all() and (dst[:, rows:] == 7).all(), f"{isa} wrote outside its region"
        written.append(dst[:cols, :rows])
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for isa, got in zip(bgmv.isas(), written):
        assert torch.equal(got.view(bits), written[0].view(bits)), isa
    expected = (src * 0.37).T.to(dtype)
    assert torch.equal(written[-1][~expected.isnan()], expected[~expected.isnan()])
    assert written[-1][expected.isnan()].isnan().all()


def test_queued_jobs_equal_lora_add_in_order_and_past_a_full_queue():
    """Jobs on the worker thread give lora_add's bits; more jobs than its queue holds (64) wait
    for room instead of overwriting; waiting on a later ticket covers every earlier one."""
    gen = torch.Generator().manual_seed(5)
    A, B = torch.randn(9, 40, 6, generator=gen), torch.randn(9, 6, 24, generator=gen)
    x = torch.randn(12, 40, generator=gen)
    expected, jobs = [], []
    for j in range(150):
        tokens = bgmv.Tokens(torch.randint(0, 9, (12,), generator=gen), torch.randn(12, generator=gen), 9)
        y0 = torch.randn(12, 24, generator=gen)
        ref = y0.clone()
        bgmv.lora_add(x, A, B, tokens, ref, threads=1)
        expected.append(ref)
        jobs.append((bgmv.lora_add_queued(x, A, B, tokens, y0), y0))
    jobs[-1][0].wait()
    for (job, y), ref in zip(jobs, expected):
        job.wait()
        assert torch.equal(y, ref)


def test_busy_passes_are_counted_and_an_unmatched_end_is_refused():
    """While a forward pass is busy the worker spins between jobs; the count must balance, or the
    worker would spin for nothing (bounded) or sleep through a pass."""
    assert bgmv.lora_busy(True) == 1 and bgmv.lora_busy(True) == 2
    assert bgmv.lora_busy(False) == 1 and bgmv.lora_busy(False) == 0
    with pytest.raises(RuntimeError, match="without a lora_busy"):
        bgmv.lora_busy(False)
    assert bgmv.lora_busy(True) == 1, "the refused end changed nothing"
    gen = torch.Generator().manual_seed(7)
    A, B, x = torch.randn(3, 8, 2, generator=gen), torch.randn(3, 2, 5, generator=gen), torch.randn(4, 8, generator=gen)
    tokens = bgmv.Tokens(torch.tensor([1, 2, 0, 1]), None, 3)
    y, ref = torch.zeros(4, 5), torch.zeros(4, 5)
    bgmv.lora_add(x, A, B, tokens, ref, threads=1)
    bgmv.lora_add_queued(x, A, B, tokens, y).wait()  # a busy worker runs jobs as a sleeping one does
    assert bgmv.lora_busy(False) == 0
    assert torch.equal(y, ref)


def test_yielding_cores_is_counted_and_ends_even_when_the_load_raises():
    """An adapter load asks the spinning LoRA threads to sleep meanwhile; the spell must end."""
    with bgmv.yielding_cores():
        with bgmv.yielding_cores():
            assert bgmv._bgmv.lora_yield(True) == 3
            assert bgmv._bgmv.lora_yield(False) == 2
    with pytest.raises(ValueError, match="a bad adapter"):
        with bgmv.yielding_cores():
            raise ValueError("a bad adapter")
    assert bgmv._bgmv.lora_yield(True) == 1 and bgmv._bgmv.lora_yield(False) == 0
    with pytest.raises(RuntimeError, match="without a lora_yield"):
        bgmv._bgmv.lora_yield(False)


def test_a_forked_child_gets_a_worker_of_its_own():
    import multiprocessing

    gen = torch.Generator().manual_seed(6)
    A, B, x = torch.randn(3, 8, 2, generator=gen), torch.randn(3, 2, 5, generator=gen), torch.randn(4, 8, generator=gen)
    tokens = bgmv.Tokens(torch.tensor([1, 2, 0, 1]), None, 3)
    y = torch.zeros(4, 5)
    bgmv.lora_add_queued(x, A, B, tokens, y).wait()  # the parent's worker runs
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_queued_in_child, (x, A, B)).get(timeout=60)  # a child without a worker would hang
    assert torch.equal(child, y)


def _queued_in_child(x, A, B):
    y = torch.zeros(4, 5)
    bgmv.lora_add_queued(x, A, B, bgmv.Tokens(torch.tensor([1, 2, 0, 1]), None, 3), y).wait()
    return y
