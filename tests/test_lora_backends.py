"""Every LoRA backend that runs here against the float64 ground truth and the torch reference.

The Triton kernels have their own module (``test_lora_triton.py``, under Triton's interpreter);
the exactness of whole served batches on each backend is in ``test_serve.py``.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.errors import ConfigError
from adapterhub.serve import lora_backends
from adapterhub.serve.lora_backends import TokenSlots, cpu_c
from adapterhub.serve.lora_backends.reference import TorchLora, lora_delta

BACKENDS = ["torch"] + (["c"] if cpu_c.available() else [])
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _stacks(slots: int, width: int, rank: int, out: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, width, rank, generator=gen) / width ** 0.5
    B = torch.randn(slots, rank, out, generator=gen)
    A[0], B[0] = 0, 0
    return A.to(dtype), B.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens_per_row", [1, 7])  # a decode step, a prefill
def test_each_backend_equals_the_truth_per_row(backend, dtype, tokens_per_row):
    A, B = _stacks(5, 96, 16, 80, dtype)
    row_slots, row_weights = [1, 1, 0, 3, 4, 4, 2, 0], [1.0, 1.0, 1.0, 0.5, 1.0, -2.0, 1.0, 1.0]
    tokens = TokenSlots.from_rows(row_slots, row_weights, tokens_per_row, 5)
    x = torch.randn(len(row_slots) * tokens_per_row, 96)
    base = torch.randn(x.shape[0], 80)
    out = base.clone()
    lora_backends.select("cpu", backend).add(x, A, B, tokens, out)
    truth = lora_delta(x, A.float(), B.float(), tokens.slots, tokens.weights)
    assert torch.allclose((out - base).double(), truth, atol=TOLERANCE[dtype] * truth.abs().max().item(), rtol=0)
    untouched = tokens.slots == 0
    assert torch.equal(out[untouched], base[untouched]), "rows without an adapter must not change"


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_adds_into_a_half_precision_output(backend):
    A, B = _stacks(3, 64, 8, 48, torch.float32, seed=1)
    tokens = TokenSlots.build([1, 1, 2, 0, 2], [1, 1, 0.25, 1, 0.25], 3)
    x = torch.randn(5, 64)
    out = torch.zeros(5, 48, dtype=torch.bfloat16)
    lora_backends.select("cpu", backend).add(x, A, B, tokens, out)
    truth = lora_delta(x, A, B, tokens.slots, tokens.weights)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.double(), truth, atol=2e-2 * truth.abs().max().item())


def test_segments_merge_neighbours_and_skip_rows_without_an_adapter():
    tokens = TokenSlots.from_rows([2, 2, 0, 1, 1, 1], [1.0, 1.0, 1.0, 1.0, 0.5, 0.5], 3, 4)
    assert tokens.segments == ((0, 6, 2, 1.0), (9, 12, 1, 1.0), (12, 18, 1, 0.5))
    assert tokens.seg_starts.tolist() == [0, 9, 12] and tokens.seg_lens.tolist() == [6, 3, 6]
    assert tokens.max_segment == 6 and tokens.slots.tolist()[6:9] == [0, 0, 0]
    same = TokenSlots.build(tokens.slots.tolist(), tokens.weights.tolist(), 4)
    assert same.segments == tokens.segments


def test_backend_choice_is_checked_before_anything_loads():
    assert lora_backends.select("cpu").name == ("c" if cpu_c.available() else "torch")
    assert isinstance(lora_backends.select("cpu", "torch"), TorchLora)
    with pytest.raises(ConfigError, match="--lora-backend triton runs on CUDA"):
        lora_backends.select("cpu", "triton")
    with pytest.raises(ConfigError, match="--lora-backend 'cuda'"):
        lora_backends.select("cpu", "cuda")
    with pytest.raises(ConfigError, match="slots outside|runs on the CPU"):
        lora_backends.select("cuda:0", "c")


def test_device_choice_is_checked():
    from adapterhub.base import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda:1: torch sees no CUDA device"):
            resolve_device("cuda:1")
