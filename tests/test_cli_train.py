"""`adapterhub train` as users run it: a real subprocess (and torchrun with 2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

VENV_BIN = Path(sys.executable).parent
BATCH, LINES = 4, 32


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, ADAPTERHUB_HOME=str(tmp_path / "registry"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def adapterhub(*args: str, cwd: Path, launcher: tuple[str, ...] = (sys.executable,), timeout: int = 300):
    return subprocess.run([*launcher, "-m", "adapterhub", *args], cwd=cwd, env=cli_env(cwd),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from adapterhub.tasks import write_split

    return write_split("sentiment", tmp_path_factory.mktemp("cli-data"), n_train=LINES, n_test=4)[0]


def train_args(base, data, out, *extra):
    return ["train", "--plugin", "lora", "--base", str(base), "--data", str(data), "--no-publish",
            "--output", str(out), "--batch-size", str(BATCH), "--no-progress", *extra]


@pytest.fixture(scope="module")
def single_run(tiny_base_dir, data_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli-single")
    out = work / "adapter"
    proc = adapterhub(*train_args(tiny_base_dir, data_file, out, "--max-steps", "5", "--set", "r=16"), cwd=work)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def meta(directory: Path) -> dict:
    return json.loads((directory / "adapterhub.json").read_text())


def peft_config(directory: Path) -> dict:
    """adapter_config.json with target_modules as a set (PEFT writes a set's iteration order)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = set(config["target_modules"])
    return config


def tensor_layout(directory: Path) -> dict[str, tuple]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_train_prints_the_adapter_location_and_applies_set(single_run):
    proc, out = single_run
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert meta(out)["metrics"]["global_step"] == 5
    assert meta(out)["method_config"]["r"] == 16


def test_output_loads_with_plain_peft_and_matches_adapterhub(single_run, tiny_base_dir, tiny_tokenizer):
    from peft import PeftModel

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base

    _, out = single_run
    batch = tiny_tokenizer(["<|user|>\nsentiment?\n\nthe good day<|end|>\n<|assistant|>\n"], return_tensors="pt",
                           add_special_tokens=False)
    with torch.no_grad():
        base = load_base(tiny_base_dir, "none").model.eval()(**batch).logits
        plain = PeftModel.from_pretrained(load_base(tiny_base_dir, "none").model, str(out)).eval()(**batch).logits
        _, ours = load_adapter(load_base(tiny_base_dir, "none").model, out)
        ours = ours.eval()(**batch).logits
    assert torch.allclose(plain, ours, atol=1e-6)
    assert not torch.allclose(plain, base, atol=1e-4)  # the adapter is really applied


def test_yaml_config_with_flags_overriding_it(tiny_base_dir, data_file, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"plugin: lora\nbase: {tiny_base_dir}\ndata: {data_file}\nno_publish: true\n"
                      f"output: {tmp_path / 'adapter'}\nmax_steps: 3\nlr: 0.001\nbatch_size: 4\nprogress: false\n"
                      "method_config:\n  r: 4\n")
    proc = adapterhub("train", "--config", str(config), "--max-steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = meta(tmp_path / "adapter")
    assert (written["training"]["max_steps"], written["training"]["lr"]) == (2, 0.001)  # flag wins, YAML kept
    assert written["metrics"]["global_step"] == 2
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "extra, drop, yaml_text, expected",
    [
        (["--set", "rank=16"], None, None, "no key 'rank'"),
        (["--set", "r=abc"], None, None, "r='abc' is not a valid int"),
        (["--lr", "-1"], None, None, "lr=-1.0 must be a positive number"),
        ([], "--plugin", None, "unknown"),
        ([], "--data", None, "train needs --data"),
        (["--data", "missing.jsonl"], "--data", None, "missing.jsonl"),
        ([], None, "learning_rate: 0.1\n", "unknown key(s) learning_rate"),
    ],
    ids=["unknown-set-key", "bad-set-value", "bad-lr", "unknown-plugin", "missing-data", "data-not-found",
         "unknown-yaml-key"],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_base_dir, data_file, tmp_path, extra, drop, yaml_text,
                                                        expected):
    args = train_args(tiny_base_dir, data_file, tmp_path / "adapter", "--max-steps", "5")
    if drop == "--plugin":
        args[args.index("--plugin") + 1] = "no-such-method"
    elif drop:
        i = args.index(drop)
        del args[i:i + 2]
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text)
        extra = [*extra, "--config", str(tmp_path / "c.yaml")]
    proc = adapterhub(*args, *extra, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "registry").exists()


def test_torchrun_trains_data_parallel_and_rank0_writes_one_adapter(single_run, tiny_base_dir, data_file, tmp_path):
    out = tmp_path / "adapter"
    proc = adapterhub(*train_args(tiny_base_dir, data_file, out, "--max-steps", "4", "--set", "r=16"), cwd=tmp_path,
                      launcher=(str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(str(out)) == 1  # only rank 0 printed (and wrote)
    metrics = meta(out)["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["epoch"] == pytest.approx(4 * BATCH * 2 / LINES)  # each step took a batch on both ranks
    _, single = single_run
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    assert peft_config(out) == peft_config(single)
    assert tensor_layout(out) == tensor_layout(single)
    assert meta(out).keys() == meta(single).keys() and meta(out)["training"].keys() == meta(single)["training"].keys()
