"""Base models: loading (optionally quantized, in a chosen dtype) and fingerprints.

Everything loads through ``AutoModelForCausalLM.from_pretrained``, so the bases that
``adapterhub base init`` writes (see :mod:`.presets`) take the same path as a real Hub model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .architectures import BNB_BLOCK, check_quantizable
from .errors import BaseModelError, ConfigError
from .presets import PRESETS, build_tokenizer, init_base, saved_dtype

__all__ = ["BNB_BLOCK", "PRESETS", "BaseModel", "build_tokenizer", "check_quantizable", "fingerprint", "init_base",
           "load_base", "load_tokenizer", "resolve_dtype"]

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp4")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


# -- loading -----------------------------------------------------------------------------------


def resolve_base_dir(name_or_dir: str | Path) -> Path:
    """A local directory for a base: the directory itself, or the Hub snapshot (downloaded once)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base directory {path} has no config.json; is it a Hugging Face model directory?")
        return path
    if path.exists() or str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") > 1:
        raise BaseModelError(
            f"base model {str(name_or_dir)!r} not found; pass a model directory (e.g. one made by "
            "`adapterhub base init --preset smollm2-135m-instruct --out DIR`) or a Hub id"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(name_or_dir),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise BaseModelError(
            f"base model {str(name_or_dir)!r} is not a local directory and could not be fetched "
            f"from the Hugging Face Hub ({type(exc).__name__}); pass a local model directory"
        ) from None


def quantization_config(quantize: str, compute_dtype: Any = None):
    """The ``BitsAndBytesConfig`` for a ``--quantize`` choice (None for ``none``).

    4-bit layers dequantize to ``compute_dtype`` for their matmuls (the load's dtype).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return None
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        bnb_4bit_use_double_quant=False,
    )


def default_device() -> str:
    """Where a model runs unless told: the first GPU when there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(choice: str | None) -> str:
    """``--device``: ``auto`` (the first GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a GPU that is not there is a ConfigError, not a crash at the first forward pass."""
    import torch

    choice = (choice or "auto").strip()
    if choice == "auto":
        return default_device()
    if choice == "cpu":
        return "cpu"
    kind, _, index = choice.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {choice}: torch sees no CUDA device here (torch {torch.__version__}); "
                          "use --device cpu, or install a CUDA build of torch")
    if index and int(index) >= count:
        raise ConfigError(f"--device {choice}: there are {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    return choice if index else "cuda:0"


def resolve_dtype(choice: str | None, directory: str | Path, device: str | None = None) -> str:
    """The dtype name a ``--dtype`` choice means for this checkpoint on this device.

    ``auto`` is the checkpoint's own dtype on an accelerator and float32 on the CPU, where half
    precision is slower and less accurate (as in vLLM and TGI); an explicit choice is taken as is.
    """
    choice = choice or "auto"
    if choice not in DTYPE_CHOICES:
        raise ConfigError(f"--dtype {choice!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if choice != "auto":
        return choice
    if str(device or default_device()).startswith("cpu"):
        return "float32"
    own = saved_dtype(directory)
    return own if own in ("bfloat16", "float16", "float32") else "float32"


@dataclasses.dataclass
class BaseModel:
    """A loaded base: model, tokenizer, where it came from and its fingerprint."""

    model: Any
    tokenizer: Any
    name: str
    directory: Path
    quantize: str
    fingerprint: str
    dtype: str = "float32"
    """The compute dtype: of the full-precision weights, or what quantized layers dequantize to."""


def load_tokenizer(name_or_dir: str | Path):
    from transformers import AutoTokenizer

    directory = resolve_base_dir(name_or_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise BaseModelError(
            f"the tokenizer of {name_or_dir} has no chat template; adapterhub renders every example "
            "through it. Use an instruction-tuned base or add a chat_template to tokenizer_config.json"
        )
    return tokenizer


def load_base(name_or_dir: str | Path, quantize: str = "none", *, device: str | None = None,
              dtype: str | None = "auto", head: str = "causal-lm") -> BaseModel:
    """Load a base model and tokenizer through ``from_pretrained``, optionally quantized.

    ``dtype`` is a ``--dtype`` choice (see :func:`resolve_dtype`). ``head`` "sequence-classification"
    loads the same weights with a fresh one-score head (a reward model's). A quantized base is placed on
    ``device`` (default: :func:`default_device`); a full-precision one stays on the CPU unless a
    device is given (the Trainer moves it to the GPU itself).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = resolve_base_dir(name_or_dir)
    dtype_name = resolve_dtype(dtype, directory, device)
    torch_dtype = getattr(torch, dtype_name)
    qconfig = quantization_config(quantize, torch_dtype)
    config = AutoConfig.from_pretrained(directory)
    if quantize in ("nf4", "fp4"):
        check_quantizable(config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device or default_device()}
    auto_class = AutoModelForCausalLM
    if head == "sequence-classification":
        auto_class = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=_pad_token_id(directory, config))
    elif head != "causal-lm":
        raise ConfigError(f"model head {head!r} is not one of causal-lm, sequence-classification")
    try:
        model = auto_class.from_pretrained(directory, **kwargs)
    except RuntimeError as exc:
        if "is invalid for input of size" in str(exc):
            raise BaseModelError(
                f"bitsandbytes could not quantize {directory} to {quantize}: {exc}. A weight row "
                f"length is not a multiple of {BNB_BLOCK}; use --quantize none"
            ) from None
        raise
    if qconfig is None and device:
        model.to(device)
    model.eval()
    return BaseModel(
        model=model,
        tokenizer=load_tokenizer(directory),
        name=str(name_or_dir),
        directory=directory,
        quantize=quantize,
        fingerprint=fingerprint(directory),
        dtype=dtype_name,
    )


def _pad_token_id(directory: Path, config: Any) -> int:
    """A sequence-classification head scores the last non-pad token, so it needs a pad id."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        tokenizer = load_tokenizer(directory)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad


# -- fingerprint -------------------------------------------------------------------------------

_FINGERPRINT_CACHE: dict[tuple, str] = {}
_CONFIG_KEYS_IGNORED = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config", "use_cache"}


def fingerprint(name_or_dir: str | Path) -> str:
    """sha256 of the unquantized base: its architecture config and every weight file's bytes.

    Computed from the files on disk, so a quantized load of the same base has the same
    fingerprint. Cached per process by (path, size, mtime) of the weight files.
    """
    directory = resolve_base_dir(name_or_dir)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise BaseModelError(
            f"{directory} has no *.safetensors weights; adapterhub loads safetensors only (no pickle)"
        )
    key = tuple((str(w.resolve()), w.stat().st_size, w.stat().st_mtime_ns) for w in weights)
    if key in _FINGERPRINT_CACHE:
        return _FINGERPRINT_CACHE[key]
    config = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weight in weights:
        digest.update(weight.name.encode())
        digest.update(_file_sha256(weight).encode())
    result = "sha256:" + digest.hexdigest()
    _FINGERPRINT_CACHE[key] = result
    return result


def _file_sha256(path: Path) -> str:
    # A Hub cache blob is named by its sha256 already; don't read gigabytes again.
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and len(resolved.name) == 64:
        return resolved.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
