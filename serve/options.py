"""Every option of ``adapterhub serve``, defined once.

Each :class:`ServerOptions` field carries its default, its help text and its choices; the CLI makes
its flags from them (:mod:`.cli`), the server reads them, Ray replicas receive them whole, and the
per-request limits (:class:`~.requests.Limits`) come from them. A new option is one field here.
No torch at import: the CLI parser reads this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterhub.base import DTYPE_CHOICES, QUANTIZE_CHOICES
from adapterhub.errors import ConfigError

from .requests import Limits

LORA_DTYPES = ("auto", "float16", "bfloat16", "float32")
LORA_OVERLAP = {"auto": None, "on": True, "off": False}
LORA_BACKENDS = ("auto", "c", "triton", "torch")

# how the CLI sets a field (metadata "cli"): its own flag (--field-name); "env": --field-name-env
# names an environment variable that holds the value (secrets stay off the command line);
# "registry": the registry flags (--registry, --registry-option, --cache-dir, --cache-max-bytes);
# None: no flag (programmatic callers only)
FLAG, ENV, REGISTRY = "flag", "env", "registry"


def _option(default: Any = dataclasses.MISSING, help: str | None = None, *, choices: tuple | None = None,
            cli: str | None = FLAG) -> Any:
    """A field with its help text and allowed values (the metadata keys of ``adapterhub.config.option``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclasses.dataclass
class ServerOptions:
    """One server: its base, registry, doors and limits (field order is ``serve --help``'s order)."""

    base: str = _option(help="base model directory or Hub id")
    quantize: str = _option("nf4", choices=QUANTIZE_CHOICES)
    device: str = _option("auto", "where the base, its KV cache, the adapter slots and sampling live: auto (the first "
                                  "GPU when there is one, else the CPU), cpu, cuda, cuda:N")
    dtype: str = _option("auto", "compute dtype of the base (auto: the checkpoint's own on a GPU, float32 on the CPU); "
                                 "a quantized base dequantizes to it", choices=DTYPE_CHOICES)
    # a directory, a URL or a RegistryLocation (a URL with its options); None: $ADAPTERHUB_HOME or ~/.adapterhub
    registry: Any = _option(None, "the registry to serve adapters from", cli=REGISTRY)
    host: str = _option("127.0.0.1", "address to bind (0.0.0.0 for every interface)")
    port: int = _option(50051)
    max_adapters: int = _option(8, "adapters kept resident (LRU; pinned never evicted)")
    max_batch: int = _option(32, "rows per decode step")
    max_queue: int = _option(256, "waiting requests before RESOURCE_EXHAUSTED")
    threads: str = _option("auto", "torch CPU threads, set before the base loads: auto = torch's own (OMP_NUM_THREADS, "
                                   "else one per core), or N. On 2 cores auto held 651 tok/s beside a busy neighbour "
                                   "(781 alone); 1 with --lora-overlap off 819 (831); 1 with the overlap's auto (on: "
                                   "its worker wants the busy core) 335 (867): bench/results/serve_threads.json")
    lora_dtype: str = _option("auto", "precision of resident LoRA weights: auto = the base's compute dtype; float16 "
                                      "halves each adapter's memory and the bytes a mixed batch reads per step",
                              choices=LORA_DTYPES)
    lora_overlap: str = _option("auto", "run a mixed batch's LoRA on a core of its own while the base layers run "
                                        "(memory-bound beside compute-bound work); auto = when torch's threads leave "
                                        "a core unused", choices=tuple(LORA_OVERLAP))
    lora_backend: str = _option("auto", "mixed-batch LoRA: auto = the C kernel on the CPU, Triton on CUDA; torch = the "
                                        "plain PyTorch reference (any device)", choices=LORA_BACKENDS)
    max_new_tokens: int = _option(Limits.max_new_tokens, "per-request limit")
    max_adapters_per_request: int = _option(Limits.max_adapters_per_request)
    token: str | None = _option(None, "name of an environment variable holding a bearer token clients must send",
                                cli=ENV)
    # when set, Admin RPCs need this token instead of ``token``
    admin_token: str | None = _option(None, "environment variable holding a separate bearer token for the Admin "
                                            "service", cli=ENV)
    max_message_bytes: int = _option(4 * 2**20, "largest request message accepted (gRPC max_receive_message_length)")
    max_context_tokens: int = _option(Limits.context_length, "prompt + new tokens per request (capped at the base's "
                                                             "context length)")
    max_adapter_bytes: int | None = _option(None, "refuse to load adapter versions with a file larger than this")
    tls_cert: str | None = _option(None, "PEM certificate chain (with --tls-key: serve TLS)")
    tls_key: str | None = _option(None, "PEM private key")
    metrics_port: int | None = _option(None, "serve Prometheus /metrics on this port")
    http_port: int | None = _option(None, "also serve the OpenAI-compatible HTTP API (/v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health, /metrics) on this port, on the "
                                          "same engine")
    http_host: str | None = _option(None, "address of the HTTP API (default: --host)")
    served_model_name: str | None = _option(None, "the base's model name in the HTTP API (default: the --base "
                                                  "directory's name)")
    grace: float = _option(10.0, "on SIGTERM or SIGINT: health turns NOT_SERVING / 503, new requests are refused "
                                 "(UNAVAILABLE / 503), and the requests in flight get this many seconds to finish "
                                 "before they end with a final error; a second signal ends them at once (default 10)")
    workers: int = _option(64, "threads answering gRPC calls (and the HTTP door's thread limit)", cli=None)
    prefix_cache_mb: int = _option(256, "memory for prompt keys/values shared across requests (a system prompt, the "
                                        "chat template's header), kept per adapter set in blocks of 16 tokens, least "
                                        "recently used first; 0 turns prefix caching off")
    prefill_chunk: int = _option(512, "prompt tokens a step prefills while other requests are generating: a longer "
                                      "prompt is prefilled over several steps, each giving the running requests a token "
                                      "(chunked prefill); 0: a prompt is prefilled whole in one step")
    weight_prepack: str = _option("auto", "auto: the base's float Linear weights on the CPU are reordered once into "
                                          "oneDNN's blocked layout, as vLLM's CPU backend does (decode steps 0.81x the "
                                          "time; a second copy of those weights in memory); off: plain F.linear",
                                  choices=("auto", "off"))

    def __post_init__(self) -> None:
        for name, value in (("--prefix-cache-mb", self.prefix_cache_mb), ("--prefill-chunk", self.prefill_chunk)):
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} {value!r}: use a whole number >= 0 (0 turns it off)")

    def limits(self) -> Limits:
        """The per-request limits these options set (the engine caps the context at the base's)."""
        return Limits(self.max_new_tokens, self.max_adapters_per_request, self.max_context_tokens)


def lora_dtype(name: str) -> Any:
    """The torch dtype for ``--lora-dtype`` (None for auto: the engine takes the base's)."""
    if name not in LORA_DTYPES:
        raise ConfigError(f"--lora-dtype {name!r}: use one of {', '.join(LORA_DTYPES)}")
    import torch  # here, not at the top: the CLI parser imports this module

    return None if name == "auto" else getattr(torch, name)


def torch_threads(value: str | int) -> int | None:
    """``--threads`` as a thread count (None for auto: leave torch's default)."""
    if str(value) == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--threads {value!r}: use auto or a number of threads >= 1")
    return n


def lora_overlap(name: str) -> bool | None:
    """``--lora-overlap`` as the engine takes it (None for auto)."""
    if name not in LORA_OVERLAP:
        raise ConfigError(f"--lora-overlap {name!r}: use one of {', '.join(LORA_OVERLAP)}")
    return LORA_OVERLAP[name]
