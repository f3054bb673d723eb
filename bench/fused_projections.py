"""Fewer, larger GEMMs (issue 33): does fusing q/k/v and gate/up into one projection each pay here?

The serving engines fuse a decoder layer's q, k and v projections into one GEMM (and gate and up
into another) at load. This measures exactly that change in isolation, on SmolLM2-135M-Instruct's
shapes (read from ``BENCH_SMOLLM2_DIR``'s ``config.json``, default the preset's cache; SmolLM2's
own shapes otherwise): per layer, the five ``F.linear`` calls the model makes against the two a
fused layer would make, on the same inputs, full precision (fp32) and nf4 (bitsandbytes'
``matmul_4bit`` on weights quantized by ``quantize_4bit``, the path a ``Linear4bit`` takes).
Token counts: decode batches of 1, 16 and 64 rows and a prefill of 16 prompts x 100 tokens.
Separate and fused alternate in ABBA order within each round (the machine is shared); the table
reports the median over rounds of fused time / separate time (below 1: fusing pays).

    python -m bench fused_projections      # writes bench/results/fused_projections.json
"""

from __future__ import annotations

import json

from . import common

ROUNDS = 7
TOKENS = {"decode 1": 1, "decode 16": 16, "decode 64": 64, "prefill 16x100": 1600}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}


def shapes() -> dict[str, int]:
    """SmolLM2-135M-Instruct's projection sizes, from the built preset where it exists."""
    config = common.smollm2_dir() / "config.json"
    cfg = json.loads(config.read_text()) if config.is_file() else SMOLLM2
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"hidden": cfg["hidden_size"], "q": cfg["hidden_size"], "kv": cfg["num_key_value_heads"] * head,
            "mlp": cfg["intermediate_size"]}


def projections(dims: dict[str, int], quantize: str):
    """(separate, fused) callables of one input: the five projections, or the two fused ones."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    outs = [dims["q"], dims["kv"], dims["kv"], dims["mlp"], dims["mlp"]]  # q, k, v, gate, up
    weights = [torch.randn(o, dims["hidden"], generator=gen) * 0.02 for o in outs]
    groups = [torch.cat(weights[:3]), torch.cat(weights[3:])]
    if quantize == "none":
        return (lambda x: [F.linear(x, w) for w in weights]), (lambda x: [F.linear(x, w) for w in groups])
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    def nf4(ws):
        packed = [quantize_4bit(w, quant_type="nf4") for w in ws]
        return lambda x: [bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in packed]

    return nf4(weights), nf4(groups)


def main() -> dict:
    import torch

    torch.set_num_threads(common.threads())
    dims = shapes()
    rows, cases = [], {}
    for quantize in ("none", "nf4"):
        separate, fused = projections(dims, quantize)
        for label, n in TOKENS.items():
            x = torch.randn(n, dims["hidden"])
            sizes = [dims["q"], dims["kv"], dims["kv"], dims["mlp"], dims["mlp"]]
            for a, b in zip(separate(x), torch.cat(fused(x), dim=-1).split(sizes, dim=-1)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the same numbers, or the ratio means nothing
            ratio, ratios, separate_s = common.abba(lambda: separate(x), lambda: fused(x), rounds=ROUNDS,
                                                    repeat=max(3, 2000 // n))
            cases[f"{quantize} {label}"] = {"fused_over_separate": ratio, "ratios": ratios,
                                            "separate_us": separate_s * 1e6, "tokens": n}
            rows.append([quantize, label, f"{separate_s * 1e6:.0f}", f"{ratio:.2f}"])
            print(rows[-1], flush=True)
    print(common.table(["weights", "tokens", "separate us/layer", "fused / separate"], rows))
    best = min(c["fused_over_separate"] for c in cases.values())
    results = {"environment": common.environment(), "shapes": dims, "rounds": ROUNDS, "cases": cases,
               "targets": [common.verdict("best fused / separate (10% faster earns its place)", best, "<=", 0.9)]}
    common.save("fused_projections", results)
    return results


if __name__ == "__main__":
    main()
