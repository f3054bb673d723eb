"""Base models: the tiny built-in presets, loading (optionally quantized) and fingerprints.

Everything loads through ``AutoModelForCausalLM.from_pretrained``, so the tiny base that
``adapterhub base init`` writes takes the same path as a real Hub model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import BaseModelError, ConfigError

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp4")
BNB_BLOCK = 64  # bitsandbytes 4-bit blocks: every weight row length must be a multiple of this

# Tokens the chat template uses; ids follow the 256 byte tokens.
SPECIAL_TOKENS = ("<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 320  # 256 bytes + specials, rounded up to a multiple of 64
    max_position_embeddings: int = 512
    initializer_range: float = 0.08  # wider than the usual 0.02 so logits can become confident


PRESETS: dict[str, Preset] = {
    # trains in seconds on 2 CPU cores; used by tests and the demo
    "tiny": Preset(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # "tiny-but-not-trivial" for benchmarks: 6 layers, hidden 512
    "small": Preset(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
}


# -- building ----------------------------------------------------------------------------------


def build_tokenizer():
    """A byte-level tokenizer (every UTF-8 byte is a token) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        model_max_length=PRESETS["tiny"].max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_quantizable(config: Any) -> None:
    """Refuse shapes bitsandbytes 4-bit cannot handle on this hardware, naming the layer."""
    dims = {
        "hidden_size (q/k/v/o/gate/up rows)": config.hidden_size,
        "intermediate_size (down_proj rows)": config.intermediate_size,
    }
    for what, value in dims.items():
        if value % BNB_BLOCK:
            raise BaseModelError(
                f"cannot quantize to 4 bit: {what} = {value} is not a multiple of {BNB_BLOCK}; "
                f"use a base whose dimensions are multiples of {BNB_BLOCK}, or --quantize none"
            )


def init_base(preset: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised Llama-architecture model + tokenizer in HF format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ConfigError(f"unknown base preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out or remove it")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=p.initializer_range,
        torch_dtype="float32",
    )
    check_quantizable(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


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
            f"base model {str(name_or_dir)!r} not found; pass a model directory "
            "(e.g. one made by `adapterhub base init --preset tiny --out DIR`) or a Hub id"
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


def quantization_config(quantize: str):
    """The ``BitsAndBytesConfig`` for a ``--quantize`` choice (None for ``none``)."""
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
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=False,
    )


@dataclasses.dataclass
class BaseModel:
    """A loaded base: model, tokenizer, where it came from and its fingerprint."""

    model: Any
    tokenizer: Any
    name: str
    directory: Path
    quantize: str
    fingerprint: str


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


def load_base(name_or_dir: str | Path, quantize: str = "none", *, device: str | None = None) -> BaseModel:
    """Load a base model and tokenizer through ``from_pretrained``, optionally quantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_base_dir(name_or_dir)
    qconfig = quantization_config(quantize)
    config = AutoConfig.from_pretrained(directory)
    if quantize in ("nf4", "fp4"):
        check_quantizable(config)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device or ("cuda:0" if torch.cuda.is_available() else "cpu")}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
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
    )


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


def base_summary(base: BaseModel) -> dict[str, Any]:
    return {"name": base.name, "fingerprint": base.fingerprint, "quantize": base.quantize, "directory": os.fspath(base.directory)}
