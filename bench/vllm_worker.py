"""vLLM's side of ``bench/vllm_peer.py``, run by the python of vLLM's own venv (not the project's).

Imports nothing from adapterhub or bench: it runs where only vLLM is installed. Protocol, one
JSON object a line: the first line on stdin is the setup (base directory, PEFT LoRA directories,
batch, context); the reply is ``{"ready": ...}``. Then each line ``{"prompts": [[ids]],
"adapters": [index or null], "max_tokens": n}`` is answered with ``{"seconds": s, "tokens":
[[ids]]}`` (greedy, EOS ignored, no detokenization: the engine it is compared with skips it too),
and ``{"quit": true}`` ends it. Replies go to the original stdout; everything vLLM prints goes to
stderr. Run with ``python -P`` so this folder's modules cannot shadow a library's.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's logs (and its subprocesses') to stderr; replies alone on the old stdout
    setup = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(setup["loras"])]
    extra = {"enable_lora": True, "max_loras": len(loras), "max_lora_rank": setup["rank"]} if loras else {}
    llm = LLM(model=setup["base"], dtype="float32", max_num_seqs=setup["batch"], max_model_len=setup["context"],
              enable_prefix_caching=False,  # the same prompts each round: a cache hit would skip the prefill
              seed=0, **extra)
    print(json.dumps({"ready": True, "vllm": vllm.__version__, "init_s": time.perf_counter() - start}), file=reply, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("quit"):
            break
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        lora = [None if a is None else loras[a] for a in job["adapters"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora if loras else None, use_tqdm=False)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}),
              file=reply, flush=True)


if __name__ == "__main__":
    main()
