"""(e) Memory: the server's resident set with the nf4 base vs unquantized, and per resident adapter.

Real ``adapterhub serve`` subprocesses; RSS from ``/proc/PID/status`` after one warm-up request.
Per-adapter cost: load ``ADAPTERS`` adapters (admin Load) and send one request through each (so
each takes its slot in the engine's stacks), then (RSS after - RSS before) / ADAPTERS, against the
adapter's tensor bytes as served (A and B in the server's ``--lora-dtype``: by default the base's
compute dtype, float32 here). Target: within 10%. What the first adapter costs beyond its share
(the stacks are allocated for every slot at once, plus first-use buffers) is reported apart: with
``ADAPTERS`` = the cache size it is amortized the way a full server amortizes it.
"""

from __future__ import annotations

from . import common

ADAPTERS = 128
LORA_DTYPE = "float32"  # the server's default (auto: the base's compute dtype, float32 here)


def tensor_elements(directory) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(directory / "adapter_model.safetensors")).values())


def weights_mb(base_dir, quantize: str) -> float:
    from adapterhub.base import load_base

    model = load_base(base_dir, quantize).model
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def main() -> dict:
    common.threads()
    base_dir = common.small_base()
    reg = common.registry(base_dir, ADAPTERS + 1)
    import torch

    elements = tensor_elements(common.lora_adapters(base_dir, 1)[0])
    per_adapter = elements * getattr(torch, LORA_DTYPE).itemsize
    results = {"adapters": ADAPTERS, "lora_dtype": LORA_DTYPE, "adapter_tensor_bytes": per_adapter,
               "adapter_file_tensor_bytes": elements * 4, "by_quantize": {}}
    for quantize in ("nf4", "none"):
        server = common.ServerProcess(base_dir, reg, quantize=quantize, max_adapters=ADAPTERS, lora_dtype=LORA_DTYPE)
        try:
            server.client.generate("warm up", max_new_tokens=4)
            start = server.rss_mb()
            for i in range(ADAPTERS):
                server.client.load(f"a{i}@1")
                server.client.generate("hello", adapters=[f"a{i}@1"], max_new_tokens=2)
                if i == 0:
                    first = server.rss_mb()
            after = server.rss_mb()
        finally:
            server.stop()
        results["by_quantize"][quantize] = {"rss_mb": start, "rss_with_adapters_mb": after, "rss_with_first_mb": first,
                                            "weights_mb": weights_mb(base_dir, quantize),
                                            "per_adapter_bytes": (after - start) * 2**20 / ADAPTERS,
                                            "first_adapter_beyond_share_mb": first - start - (after - start) / ADAPTERS}
    nf4, none = results["by_quantize"]["nf4"], results["by_quantize"]["none"]
    print(common.table(["measure", "nf4", "none (fp32)", "nf4 / none"], [
        ["base weights (MB)", nf4["weights_mb"], none["weights_mb"], nf4["weights_mb"] / none["weights_mb"]],
        ["server RSS, warm (MB)", nf4["rss_mb"], none["rss_mb"], nf4["rss_mb"] / none["rss_mb"]],
        [f"RSS with {ADAPTERS} adapters (MB)", nf4["rss_with_adapters_mb"], none["rss_with_adapters_mb"], ""],
        ["per adapter / its tensor bytes", nf4["per_adapter_bytes"] / per_adapter,
         none["per_adapter_bytes"] / per_adapter, ""],
        ["first adapter, beyond its share (MB)", nf4["first_adapter_beyond_share_mb"],
         none["first_adapter_beyond_share_mb"], ""],
    ]))
    print(f"adapter tensor bytes as served ({LORA_DTYPE}): {per_adapter / 2**20:.2f} MB "
          f"(file, float32: {elements * 4 / 2**20:.2f} MB)")
    results["targets"] = [common.verdict(f"per-adapter RSS / tensor bytes ({q})", r["per_adapter_bytes"] / per_adapter, "<=", 1.1)
                          for q, r in results["by_quantize"].items()]
    results["targets"] += [common.verdict(f"per-adapter RSS / tensor bytes ({q}), lower bound", r["per_adapter_bytes"] / per_adapter, ">=", 0.9)
                           for q, r in results["by_quantize"].items()]
    common.save("memory", results)

    def draw(ax):
        labels = ["weights", "server RSS", f"RSS + {ADAPTERS} adapters"]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [nf4["weights_mb"], nf4["rss_mb"], nf4["rss_with_adapters_mb"]], 0.4, label="nf4")
        ax.bar([x + 0.2 for x in xs], [none["weights_mb"], none["rss_mb"], none["rss_with_adapters_mb"]], 0.4, label="none (fp32)")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("MB")
        ax.set_title("(e) server memory, small base")
        ax.legend()

    common.plot("memory", draw)
    return results


if __name__ == "__main__":
    main()
