"""Triton's LoRA backend for CUDA: Punica-style SGMV, a shrink then an expand over segments.

Why: the torch reference launches two matmuls per segment, so a decode step with 32 adapters is
64 small launches. Here a mixed batch is two launches. A program works on one block of one
segment's tokens and loads its adapter's A (or B) tile once for all of them (SGMV); a decode
step's one-token segments are the BGMV case of the same kernels.

* shrink: ``h[t] = w * x[t] @ A_T[slot]``, float32 ``[T, R]``; grid (segment, token block, K split).
  When the batch gives few programs (a decode step) ``in`` is split and the parts ``atomic_add``-ed.
* expand: ``out[t] += h[t] @ B_T[slot]``, summed in float32 and stored once in ``out``'s dtype;
  grid (segment, token block, out block).

Precision: when ``x`` has the stacks' 16-bit dtype, shrink's ``tl.dot`` takes both as they are
(tensor cores, exact products, float32 sums). Otherwise, and in expand (whose ``h`` is float32),
both operands are float32 and multiplied as "tf32x3" (three TF32 tensor-core products: float32
accuracy, about 1e-6, where plain TF32 would give 1e-3 and "ieee" spills registers on sm_90).
Ranks are padded to a power of two >= 16 by masks (``tl.dot`` needs 16 in every dimension).

Triton is imported when present; without it the module still imports, :func:`available` is False,
``supports`` says no and ``add`` raises ImportError. tests/test_lora_triton.py runs the kernels
on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from .contract import LoraBackend, TokenSlots

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised by a test in a subprocess
    triton = tl = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

_STACK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256


def available() -> bool:
    """Whether triton imports here (the kernels still need CUDA, or TRITON_INTERPRET=1 on the CPU)."""
    return _IMPORT_ERROR is None


if triton is not None:
    F32_DOT = tl.constexpr("tf32x3")

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, seg_starts, seg_lens, seg_slots, seg_weights, K, R, K_PER_SPLIT,
                       sxt, sxk, sas, sak, sar, sht, shr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       SPLIT_K: tl.constexpr, SAME_DTYPE: tl.constexpr):
        g, mb, ks = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg_len = tl.load(seg_lens + g)
        if mb * BLOCK_M >= seg_len:  # a short segment in a grid sized by the longest
            return
        row = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < seg_len
        tok = tl.load(seg_starts + g).to(tl.int64) + row
        a_ptr += tl.load(seg_slots + g).to(tl.int64) * sas
        rs = tl.arange(0, BLOCK_R)
        r_ok = rs < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            k = ks * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xt = tl.load(x_ptr + tok[:, None] * sxt + k[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + k[:, None] * sak + rs[None, :] * sar, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if SAME_DTYPE:
                acc = tl.dot(xt, at, acc)
            else:
                acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision=F32_DOT)
        acc = acc * tl.load(seg_weights + g)
        h_ptrs = h_ptr + tok[:, None] * sht + rs[None, :] * shr
        if SPLIT_K == 1:
            tl.store(h_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])
        else:
            tl.atomic_add(h_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, out_ptr, seg_starts, seg_lens, seg_slots, N, R,
                       sht, shr, sbs, sbr, sbn, sot, son,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        g, mb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg_len = tl.load(seg_lens + g)
        if mb * BLOCK_M >= seg_len:
            return
        row = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < seg_len
        tok = tl.load(seg_starts + g).to(tl.int64) + row
        b_ptr += tl.load(seg_slots + g).to(tl.int64) * sbs
        ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):  # one step up to rank 32
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            h = tl.load(h_ptr + tok[:, None] * sht + rs[None, :] * shr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rs[:, None] * sbr + ns[None, :] * sbn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(h, b.to(tl.float32), acc, input_precision=F32_DOT)
        o_ptrs = out_ptr + tok[:, None] * sot + ns[None, :] * son
        o_ok = row_ok[:, None] & n_ok[None, :]
        o = tl.load(o_ptrs, mask=o_ok, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_ok)

    # Set by TRITON_INTERPRET=1 when this module was imported (that is when triton.jit decides).
    _INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class TritonLora(LoraBackend):
    """Block sizes were chosen so that no variant spills registers on sm_90 (checked with ptxas)."""

    name = "triton"
    BLOCK_K = 32  # shrink: a loop step loads [BLOCK_M, 32] of x and [32, R] of A
    BLOCK_N = 32  # expand: a program writes [BLOCK_M, 32] of out
    MAX_EXPAND_R = 32  # expand: ranks above this loop over R in steps of 32
    MIN_PROGRAMS = 128  # below this many (segment, token block) programs, shrink splits ``in``...
    MIN_K_PER_SPLIT = 256  # ...into parts of at least this much

    def blocks(self, segments: int, max_segment: int, K: int, R: int) -> tuple[int, int, int, int, int]:
        """(BLOCK_M, BLOCK_R, token blocks per segment, K splits, K per split) for a batch."""
        block_r = _pow2_at_least_16(R)
        # Token blocks: as many rows as the longest segment needs, fewer for wide ranks (registers).
        block_m = min(16 if max_segment <= 16 else 32 if max_segment <= 32 else 64, max(16, 2048 // block_r))
        m_blocks = triton.cdiv(max_segment, block_m)
        # Split ``in`` when the batch alone gives too few programs (a decode step, few adapters).
        split = min(max(1, self.MIN_PROGRAMS // (segments * m_blocks)), max(1, K // self.MIN_K_PER_SPLIT))
        k_per_split = triton.cdiv(triton.cdiv(K, split), self.BLOCK_K) * self.BLOCK_K
        return block_m, block_r, m_blocks, triton.cdiv(K, k_per_split), k_per_split

    def supports(self, stack_dtype: torch.dtype, rank: int) -> bool:
        return available() and stack_dtype in _STACK_DTYPES and 1 <= rank <= MAX_RANK

    def add(self, x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, tokens: TokenSlots, out: torch.Tensor) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError("the triton LoRA backend needs triton (pip install 'adapterhub[gpu]')") from _IMPORT_ERROR
        G, max_seg = tokens.seg_starts.numel(), tokens.max_segment
        if G == 0 or max_seg == 0:
            return
        (T, K), (S, K2, R), N = x.shape, A_T.shape, B_T.shape[2]
        if K2 != K or B_T.shape[:2] != (S, R) or out.shape != (T, N):
            raise ValueError(f"shapes: x {tuple(x.shape)}, A_T {tuple(A_T.shape)}, B_T {tuple(B_T.shape)}, out {tuple(out.shape)}")
        if not self.supports(A_T.dtype, R) or B_T.dtype != A_T.dtype or out.dtype not in _STACK_DTYPES:
            raise ValueError(f"stacks of {A_T.dtype}/{B_T.dtype}, rank {R}, out of {out.dtype}: see supports()")

        block_m, block_r, m_blocks, split, k_per_split = self.blocks(G, max_seg, K, R)
        h = (torch.zeros if split > 1 else torch.empty)((T, R), dtype=torch.float32, device=x.device)
        # Triton's interpreter has no bfloat16 tl.dot (it multiplies the bit patterns:
        # triton-lang/triton#11584), so there bfloat16 goes the float32 way.
        same = x.dtype == A_T.dtype in (torch.float16, torch.bfloat16) and not (_INTERPRETED and x.dtype == torch.bfloat16)
        _shrink_kernel[(G, m_blocks, split)](
            x, A_T, h, tokens.seg_starts, tokens.seg_lens, tokens.seg_slots, tokens.seg_weights, K, R, k_per_split,
            x.stride(0), x.stride(1), A_T.stride(0), A_T.stride(1), A_T.stride(2), h.stride(0), h.stride(1),
            BLOCK_M=block_m, BLOCK_K=self.BLOCK_K, BLOCK_R=block_r, SPLIT_K=split, SAME_DTYPE=same)
        _expand_kernel[(G, m_blocks, triton.cdiv(N, self.BLOCK_N))](
            h, B_T, out, tokens.seg_starts, tokens.seg_lens, tokens.seg_slots, N, R,
            h.stride(0), h.stride(1), B_T.stride(0), B_T.stride(1), B_T.stride(2), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=self.BLOCK_N, BLOCK_R=min(block_r, self.MAX_EXPAND_R))
