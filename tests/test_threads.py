"""``--threads`` reaches torch before the model loads, in every command that runs the model here:
``merge`` and ``score`` (default 1, like ``train``: bench/results/train_threads.json) and ``serve``
(default auto, torch's own: bench/results/serve_threads.json)."""

from __future__ import annotations

import json

import pytest
import torch

from objective_helpers import run


@pytest.fixture
def threads_at_load(monkeypatch):
    """Torch's thread count each time ``module.load_base`` runs (patch it with ``spy(module)``)."""
    seen: list[int] = []

    def spy(module):
        real = module.load_base

        def recording(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "load_base", recording)
        return seen

    return spy


def _train(base, registry, *args: str) -> str:
    code, out, err = run("train", "--base", str(base), "--registry", str(registry), "--no-progress", "--max-steps", "1",
                         *args)
    assert code == 0, err
    return out.strip().splitlines()[-1]


def test_merge_runs_on_the_threads_it_is_given(tiny_base_dir, sentiment_data, tmp_path, threads_at_load):
    from adapterhub import pipeline

    ref = _train(tiny_base_dir, tmp_path / "registry", "--plugin", "lora", "--data", str(sentiment_data[0]),
                 "--task", "t")
    seen = threads_at_load(pipeline)
    for n, given in ((1, ()), (2, ("--threads", "2"))):
        torch.set_num_threads(3 - n)
        code, _, err = run("merge", ref, "--base", str(tiny_base_dir), "--out", str(tmp_path / f"merged-{n}"),
                           "--registry", str(tmp_path / "registry"), *given)
        assert code == 0, err
        assert seen[-1] == n and torch.get_num_threads() == n
    code, _, err = run("merge", ref, "--base", str(tiny_base_dir), "--out", str(tmp_path / "merged-0"),
                       "--registry", str(tmp_path / "registry"), "--threads", "0")
    assert code == 2 and "--threads 0 must be >= 1" in err


def test_score_runs_on_the_threads_it_is_given(tiny_base_dir, tmp_path, threads_at_load):
    from adapterhub.objectives import scoring

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}) + "\n"
                             for i in range(4)))
    ref = _train(tiny_base_dir, tmp_path / "registry", "--plugin", "lora", "--objective", "reward",
                 "--data", str(pairs), "--task", "rm", "--batch-size", "4")
    seen = threads_at_load(scoring)
    for n, given in ((1, ()), (2, ("--threads", "2"))):
        torch.set_num_threads(3 - n)
        code, _, err = run("score", ref, "--data", str(pairs), "--registry", str(tmp_path / "registry"), *given)
        assert code == 0, err
        assert seen[-1] == n and torch.get_num_threads() == n


def test_serve_threads_reach_torch_before_the_base_loads(tiny_base_dir, tmp_path):
    from adapterhub.errors import ConfigError
    from adapterhub.serve.cli import add_option_arguments
    from adapterhub.serve.lora_backends import cpu_c
    from adapterhub.serve.server import AdapterServer, ServerOptions

    with pytest.raises(ConfigError, match="--threads 'many'"):
        AdapterServer(ServerOptions(base=str(tiny_base_dir / "missing"), threads="many"))
    torch.set_num_threads(2)
    srv = AdapterServer(ServerOptions(base=str(tiny_base_dir), registry=str(tmp_path / "registry"), port=0,
                                      quantize="none", threads="1")).start()
    try:
        assert torch.get_num_threads() == 1
        assert srv.engine.lora_overlap == cpu_c.spare_core()  # auto: judged on the threads just set
    finally:
        srv.stop(grace=1)
    import argparse

    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    assert parser.parse_args(["--base", "b"]).threads == ServerOptions.threads == "auto"
    assert parser.parse_args(["--base", "b", "--threads", "3"]).threads == "3"
