"""The Triton SGMV LoRA backend (serve/lora_backends/triton_sgmv.py) against the float64 truth
(``lora_delta``) and the torch reference (``TorchLora``), run on this CPU by Triton's interpreter.

Why a subprocess: ``triton.jit`` decides at decoration time, that is when triton_sgmv is first
imported, whether a kernel is compiled or interpreted (TRITON_INTERPRET=1). Setting the variable
at the top of this module would be too late if any earlier test in the session (or a plugin)
imported the backend, and would leak into every later test. So one subprocess, started with
TRITON_INTERPRET=1, runs this file as a script: it runs every case of ``CASES`` once and prints
JSON, and each pytest test asserts on one case's result. The same ``run_case`` runs the compiled
kernels in-process in the CUDA test.

Tolerances: ``|got - truth| <= eps(out) * |truth| + 1e-4 * max|truth|``. The 16-bit values of x
and the stacks are exact inputs to the truth too and all sums are float32, so the only loose part
is the final rounding to ``out``'s dtype: half an ulp on a GPU, but a whole one for bfloat16 under
the interpreter, which truncates float32 to bfloat16 (eps is one ulp: 2^-7 bfloat16, 2^-10
float16). Against TorchLora the bound adds its own roundings: the delta, then the sum, half an ulp
of each. A dropped weight, a wrong slot or a lost segment is off by the size of the delta.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = {F32: 0.0, F16: 2.0**-10, BF16: 2.0**-7}


def _runs(*runs):
    """Per-token slots and weights from (length, slot, weight) runs."""
    slots = [s for n, s, _ in runs for _ in range(n)]
    weights = [w for n, _, w in runs for _ in range(n)]
    return slots, weights


_decode = _runs(*[(1, 1 + (7 * i) % 5, (1.0, 0.5, 2.0, -1.0)[i % 4]) for i in range(32)])
_decode_gaps = _runs(*[r for i in range(16) for r in ((1, 1 + i % 5, 1.5), (1, 0, 1.0))])

# name: (slots and weights per token, in, out, rank, stack dtype, x dtype, out dtype)
CASES = {
    # several segments, slot-0 tokens between them, weights != 1, a weight-0 run, odd widths
    "mixed_r8_odd_f32": (_runs((5, 1, 1.0), (3, 0, 1.0), (6, 2, 0.5), (4, 2, 2.0), (2, 3, 0.0), (7, 4, -1.25)),
                         100, 100, 8, F32, F32, F32),
    # prefill, SmolLM2's widths (576 -> 1536), bfloat16 model: x, stacks and out bfloat16
    "prefill_r16_smollm2_bf16": (_runs((17, 1, 1.0), (2, 0, 1.0), (40, 3, 0.5), (23, 2, 1.0)),
                                 576, 1536, 16, BF16, BF16, BF16),
    # decode: 32 one-token segments (BGMV), in split across programs, float16 stacks, float32 x and out
    "decode_r16_f16_stacks_f32_out": (_decode, 576, 100, 16, F16, F32, F32),
    # decode with slot-0 tokens between, bfloat16 stacks and x, float32 out
    "decode_gaps_r8_bf16_stacks_f32_out": (_decode_gaps, 100, 1536, 8, BF16, BF16, F32),
    # float16 throughout (the tensor-core path of shrink), a segment over two token blocks
    "prefill_r16_f16": (_runs((70, 2, 1.0), (3, 0, 1.0), (19, 5, 0.75)), 100, 100, 16, F16, F16, F16),
    # float32 stacks, bfloat16 out
    "mixed_r16_f32_stacks_bf16_out": (_runs((2, 0, 1.0), (21, 4, 1.0), (9, 1, 3.0)), 100, 100, 16, F32, F32, BF16),
    # rank 48 (not a power of two, expand loops over R) and 128 (token blocks of 16: 3 per segment)
    "prefill_r48_bf16_stacks_f32_out": (_runs((40, 1, 1.0), (1, 0, 1.0), (17, 2, 0.5)), 100, 100, 48, BF16, F32, F32),
    "prefill_r128_f16_stacks_bf16_out": (_runs((40, 3, 1.0), (17, 1, -0.5)), 64, 100, 128, F16, BF16, BF16),
    # nothing to do: every token without an adapter or with weight 0
    "no_segments": (_runs((5, 0, 1.0), (3, 2, 0.0)), 100, 100, 8, F32, F32, F32),
}


def run_case(name: str, device: str) -> dict:
    """Run one case of ``CASES`` on ``device``; the worst error as a share of its bound (<= 1 passes)."""
    from adapterhub.serve.lora_backends import TokenSlots
    from adapterhub.serve.lora_backends.reference import TorchLora, lora_delta
    from adapterhub.serve.lora_backends.triton_sgmv import TritonLora

    (slots, weights), K, N, R, stack_dtype, x_dtype, out_dtype = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    S, T = 6, len(slots)
    A_T = (torch.randn(S, K, R, generator=gen) / K**0.5).to(stack_dtype)
    B_T = torch.randn(S, R, N, generator=gen).to(stack_dtype)
    A_T[0], B_T[0] = 1.0, 1.0  # slot 0 is all zeros in a pool; here it must simply never be read
    x = torch.randn(T, K + 3, generator=gen).to(x_dtype)[:, 3:]  # a view: x's row stride is not K
    base = torch.randn(T, N + 5, generator=gen).to(out_dtype)
    tokens = TokenSlots.build(slots, weights, S, device=device)
    truth = base[:, 2:N + 2].double() + lora_delta(x, A_T, B_T, tokens.slots.cpu(),
                                                   None if tokens.weights is None else tokens.weights.cpu())
    idle = torch.tensor([s == 0 or w == 0 for s, w in zip(slots, weights)])  # tokens in no segment

    backend = TritonLora()
    assert backend.supports(stack_dtype, R)
    wide = base.clone().to(device)  # (on the CPU .to would hand back base itself)
    out = wide[:, 2:N + 2]  # out is a view too: columns outside it must stay as they were
    backend.add(x.to(device), A_T.to(device), B_T.to(device), tokens, out)
    ref = base[:, 2:N + 2].clone().to(device)
    TorchLora().add(x.to(device), A_T.to(device), B_T.to(device), tokens, ref)
    got, ref, wide = out.double().cpu(), ref.double().cpu(), wide.cpu()

    scale, delta = float(truth.abs().max()), (truth - base[:, 2:N + 2].double()).abs()
    bound = EPS[out_dtype] * truth.abs() + 1e-4 * scale
    # TorchLora rounds the delta to out's dtype, then the sum: half an ulp of each
    bound_torch = bound + EPS[out_dtype] / 2 * (delta + truth.abs()) + 1e-4 * scale
    plan = backend.blocks(max(1, len(tokens.segments)), max(1, tokens.max_segment), K, R)
    return {
        "vs_truth": float(((got - truth).abs() / bound).max()),
        "vs_torch": float(((got - ref).abs() / bound_torch).max()),
        "outside_untouched": bool(torch.equal(wide[:, :2], base[:, :2]) and torch.equal(wide[:, N + 2:], base[:, N + 2:])),
        "idle_rows_exact": bool(torch.equal(got[idle], base[idle, 2:N + 2].double())),
        "delta_scale": float(delta.max()),
        "plan": dict(zip(("block_m", "block_r", "m_blocks", "split_k", "k_per_split"), plan)),
        "segments": len(tokens.segments),
    }


def _main() -> None:
    """The subprocess: every case under the interpreter, one JSON object on the last line."""
    from adapterhub.serve.lora_backends import triton_sgmv

    results = {"interpreted": triton_sgmv._INTERPRETED}
    for name in CASES:
        try:
            results[name] = run_case(name, "cpu")
        except Exception as e:  # reported by that case's test, the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("interpreted"), "the kernels were not interpreted: TRITON_INTERPRET did not reach triton"
    return results


def _check(name: str, r: dict) -> None:
    assert "error" not in r, f"{name}: {r.get('error')}"
    assert r["vs_truth"] <= 1.0, f"{name}: error {r['vs_truth']:.3g}x the bound against float64 truth ({r})"
    assert r["vs_torch"] <= 1.0, f"{name}: error {r['vs_torch']:.3g}x the bound against TorchLora ({r})"
    assert r["outside_untouched"], f"{name}: wrote outside the out view"
    assert r["idle_rows_exact"], f"{name}: changed tokens without an adapter (slot 0 or weight 0)"


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_the_reference(interpreted, name):
    _check(name, interpreted[name])


def test_the_cases_reach_every_path(interpreted):
    """Split-K and not, several token blocks per segment, an expand looping over R, a decode batch."""
    plans = [r["plan"] for r in interpreted.values()]
    assert {p["split_k"] > 1 for p in plans} == {True, False}
    assert any(p["m_blocks"] > 1 for p in plans)
    assert any(p["block_r"] > 32 for p in plans)  # TritonLora.MAX_EXPAND_R
    assert interpreted["decode_r16_f16_stacks_f32_out"]["segments"] == 32
    assert interpreted["no_segments"]["segments"] == 0
    assert interpreted["no_segments"]["delta_scale"] == 0
    assert all(r["delta_scale"] > 0.5 for n, r in interpreted.items() if n != "no_segments"), "deltas too small to test"


def test_without_triton_the_module_imports_and_refuses():
    """Where triton is missing: importing works, available() is False, supports() says no, add() raises."""
    code = """if True:
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from adapterhub.serve.lora_backends import TokenSlots, triton_sgmv
        assert not triton_sgmv.available()
        backend = triton_sgmv.TritonLora()
        assert not backend.supports(torch.float16, 16)
        x, A, B = torch.zeros(1, 4), torch.zeros(2, 4, 2), torch.zeros(2, 2, 4)
        try:
            backend.add(x, A, B, TokenSlots.build([1], [1.0], 2), torch.zeros(1, 4))
        except ImportError as e:
            assert "needs triton" in str(e), e
        else:
            raise AssertionError("add() ran without triton")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels")
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_kernels_on_cuda_match_the_reference(name):
    pytest.importorskip("triton")
    _check(name, run_case(name, "cuda"))


if __name__ == "__main__":
    _main()
