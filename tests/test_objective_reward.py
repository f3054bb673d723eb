"""The ``reward`` objective: a reward model as an adapter, scored offline and refused by the server.

Every run is real: TRL's RewardTrainer for a few steps on the tiny random base, published to a
registry in a temp dir, loaded back by ``RewardModel`` and ``adapterhub score``, and offered to a
real server on 127.0.0.1 (which must refuse to generate with it and keep serving).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from objective_helpers import run, write

from adapterhub.errors import ConfigError
from adapterhub.manager import PluginManager

WORDS = {"positive": ("good", "great", "happy", "love"), "negative": ("bad", "sad", "awful", "poor")}


def pair_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        other = "negative" if label == "positive" else "positive"
        rows.append({"instruction": "sentiment?", "input": f"the {WORDS[label][(i // 2) % 4]} day {i}",
                     "chosen": label, "rejected": other})
    return rows


def train(base: Path, registry: Path, *args: str) -> str:
    code, out, err = run("train", "--base", str(base), "--registry", str(registry), "--no-progress", "--seed", "0",
                         *args)
    assert code == 0, err
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows(32))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def reward_lora(tiny_base_dir, pairs, registry) -> str:
    return train(tiny_base_dir, registry, "--plugin", "lora", "--objective", "reward", "--data", str(pairs),
                 "--task", "sentiment-rm", "--max-steps", "24", "--lr", "5e-3", "--batch-size", "8")


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory, tiny_base_dir, registry) -> str:
    from adapterhub.tasks import write_split

    data, _ = write_split("sentiment", tmp_path_factory.mktemp("sft"), n_train=16, n_test=1)
    return train(tiny_base_dir, registry, "--plugin", "lora", "--data", str(data), "--task", "senti",
                 "--max-steps", "2")


def untrained_accuracy(base_dir: Path, rows: list[dict], method_name: str = "lora") -> float:
    """Ranking accuracy of a fresh head + fresh adapter: where training starts."""
    from adapterhub.base import load_base
    from adapterhub.objectives.scoring import head_apart, init_head, ready_for_methods, render, rewards
    from adapterhub.objectives.shapes import prompt_turns
    from adapterhub.training import seed_everything

    base = load_base(base_dir, "none", head="sequence-classification")
    seed_everything(0)
    init_head(base.model)
    method = PluginManager(autoload=False).get_method(method_name)
    with head_apart(ready_for_methods(base.model)):
        model = method.attach(base.model, method.make_config({}))
    tok = base.tokenizer
    seqs = [render(tok, prompt_turns(r, "row"), r[k]) for k in ("chosen", "rejected") for r in rows]
    scores = rewards(model, tok.pad_token_id, seqs, 16)
    n = len(rows)
    return sum(c > r for c, r in zip(scores[:n], scores[n:])) / n


# -- train, publish, score ------------------------------------------------------------------------


def test_a_lora_reward_model_learns_is_published_with_its_head_and_ranks_pairs(reward_lora, registry, pairs,
                                                                               tiny_base_dir):
    from safetensors.torch import load_file

    from adapterhub.registry import open_registry

    store = open_registry(str(registry))
    manifest = store.manifest(reward_lora)
    assert manifest.training["objective"] == {"name": "reward", "config": {"center_rewards_coefficient": 0.0},
                                             "head": "sequence-classification"}
    assert manifest.metrics["train_accuracy"] > 0.5
    head = load_file(str(store.materialize(manifest) / "reward_head.safetensors"))
    assert set(head) == {"score.weight"} and head["score.weight"].shape == (1, 128)

    before = untrained_accuracy(tiny_base_dir, pair_rows(32))
    code, out, err = run("score", reward_lora, "--data", str(pairs), "--registry", str(registry), "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    summary = lines[-1]
    assert [r["line"] for r in lines[:-1]] == list(range(1, 33))
    assert summary["pairs"] == 32 and summary["adapter"] == reward_lora
    assert summary["accuracy"] >= 0.9 and summary["accuracy"] > before + 0.2, (before, summary)
    assert summary["correct"] == sum(r["chosen"] > r["rejected"] for r in lines[:-1])

    code, text, _ = run("score", reward_lora, "--data", str(pairs), "--registry", str(registry))
    assert code == 0 and f"ranking accuracy: {summary['accuracy']:.4f} ({summary['correct']}/32 pairs" in text


def test_scoring_answers_gives_one_reward_a_line_the_same_as_in_pairs(reward_lora, registry, pairs, tmp_path):
    rows = pair_rows(32)[:5]
    answers = write(tmp_path / "answers.jsonl", [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n"
                                                                                      f"{r['input']}"}],
                                                  "response": r["chosen"]} for r in rows])
    code, out, err = run("score", reward_lora, "--data", str(answers), "--registry", str(registry), "--batch-size", "2")
    assert code == 0, err
    plain = [float(x) for x in out.split()]
    code, out, _ = run("score", reward_lora, "--data", str(pairs), "--registry", str(registry), "--json")
    in_pairs = [json.loads(line)["chosen"] for line in out.strip().splitlines()[:5]]
    assert plain == pytest.approx(in_pairs, abs=1e-5)  # the instruction shape renders like the chat turns


@pytest.mark.parametrize("method_name, options", [
    ("adapter", {"lr": 2e-3, "max_steps": 12}),  # a bottleneck adapter: the head trains beside it
    ("full", {"lr": 1e-4, "max_steps": 4}),  # every weight trains; the head is still the objective's
    ("prefix", {"lr": 1e-2, "max_steps": 4}),  # PEFT prompt learning that keeps input_ids
])
def test_reward_model_load_scores_as_the_trained_model_did(method_name, options, tiny_base_dir, pairs, tmp_path):
    """RewardModel.load(dir).score equals TRL's own forward of the in-memory trained model."""
    from trl import RewardConfig, RewardTrainer

    from adapterhub.adapters import save_adapter
    from adapterhub.base import load_base
    from adapterhub.objective import TrainingJob
    from adapterhub.objectives.scoring import RewardModel
    from adapterhub.training import TrainOptions, seed_everything

    manager = PluginManager(autoload=False)
    method, objective = manager.get_method(method_name), manager.get_objective("reward")
    config = method.make_config({})
    base = load_base(tiny_base_dir, "none", head=objective.head)
    seed_everything(0)
    rows = objective.read_data(pairs)
    job = TrainingJob(method=method, method_config=config, config=objective.make_config({}), base=base, rows=rows,
                      options=TrainOptions(batch_size=8, logging_steps=1, progress=False, seed=0, **options))
    result = objective.train(job)
    if method_name == "adapter":
        losses = [h["loss"] for h in result.history if "loss" in h]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    out = save_adapter(method, result.model, config, tmp_path / "rm", base={"name": str(tiny_base_dir),
                                                                             "fingerprint": base.fingerprint},
                       training={"objective": {"name": "reward", **objective.lineage(job)}})
    objective.save_extra(result.model, out)

    tok = base.tokenizer
    args = RewardConfig(output_dir=str(tmp_path / "run"), per_device_eval_batch_size=len(rows), report_to="none",
                        use_cpu=True, max_length=512)
    from datasets import Dataset

    trainer = RewardTrainer(model=result.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    logits = trainer.predict(trainer.train_dataset).predictions.reshape(-1)  # TRL's batch: chosen, then rejected

    loaded = RewardModel.load(str(out))  # the base recorded in adapterhub.json
    assert loaded.reference == str(out)
    scored = loaded.score([r["prompt"] for r in rows] * 2,
                          [r[k][0]["content"] for k in ("chosen", "rejected") for r in rows], batch_size=5)
    assert scored == pytest.approx(logits.tolist(), abs=1e-4)


def test_qlora_trains_a_reward_model_on_a_4bit_base_and_scores_on_it(tiny_base_dir, pairs, tmp_path):
    """TRL casts a quantized model's trainable weights to bfloat16; the plain Linear head must not be."""
    ref = train(tiny_base_dir, tmp_path, "--plugin", "qlora", "--objective", "reward", "--data", str(pairs),
                "--task", "rm-4bit", "--max-steps", "2", "--batch-size", "8")
    code, out, err = run("score", ref, "--data", str(pairs), "--registry", str(tmp_path), "--quantize", "nf4")
    assert code == 0 and "ranking accuracy: " in out.splitlines()[-1], err


def test_continuing_a_reward_model_keeps_its_head(reward_lora, sft_lora, registry, pairs, tiny_base_dir):
    from adapterhub.objectives.scoring import RewardModel
    from adapterhub.objectives.shapes import read_pairs

    child = train(tiny_base_dir, registry, "--plugin", "lora", "--objective", "reward", "--data", str(pairs),
                  "--task", "sentiment-rm", "--from", reward_lora, "--max-steps", "1", "--lr", "1e-9")
    rows = read_pairs(pairs)[:6]
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows]
    parent = RewardModel.load(reward_lora, registry=str(registry)).score(prompts, answers)
    assert RewardModel.load(child, registry=str(registry)).score(prompts, answers) == pytest.approx(parent, abs=1e-4)

    code, _, err = run("train", "--base", str(tiny_base_dir), "--registry", str(registry), "--plugin", "lora",
                       "--objective", "reward", "--data", str(pairs), "--task", "x", "--from", sft_lora)
    assert code != 0 and "not a reward model (no reward_head.safetensors)" in err, err


# -- what is refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["prompt", "ptuning"])
def test_soft_prompt_methods_are_refused_naming_the_method_and_what_works(method_name, tiny_base_dir, pairs,
                                                                           tmp_path):
    code, _, err = run("train", "--base", str(tiny_base_dir), "--registry", str(tmp_path), "--plugin", method_name,
                       "--objective", "reward", "--data", str(pairs), "--task", "x", "--max-steps", "1")
    assert code == 2, err
    assert f"method {method_name!r} cannot train a reward model" in err and "Methods that work: lora" in err, err


def test_bad_lines_and_too_long_pairs_are_refused(tiny_base_dir, tmp_path):
    data = write(tmp_path / "bad.jsonl", [pair_rows(1)[0], {"prompt": "hi", "chosen": "a"}])
    code, _, err = run("train", "--base", str(tmp_path / "no-base"), "--plugin", "lora", "--objective", "reward",
                       "--data", str(data), "--task", "x", "--registry", str(tmp_path / "reg"))
    assert code == 2 and f"{data}:2: missing 'rejected'" in err, err

    long = write(tmp_path / "long.jsonl", pair_rows(3) + [{"prompt": "x " * 40, "chosen": "a", "rejected": "b"}])
    code, _, err = run("train", "--base", str(tiny_base_dir), "--plugin", "lora", "--objective", "reward",
                       "--data", str(long), "--task", "x", "--registry", str(tmp_path / "reg"), "--max-length", "64")
    assert code == 2 and "1 of 4 training pairs" in err and "--max-length 64" in err, err

    with pytest.raises(ConfigError, match="center_rewards_coefficient=-1.0 must be >= 0"):
        PluginManager(autoload=False).get_objective("reward").make_config({"center_rewards_coefficient": "-1"})


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "hi", "response": "a"}, {"prompt": "hi"}], "2: give the answer to score as one of"),
    ([{"prompt": "hi", "response": "a"}, {"prompt": "hi", "chosen": "a", "rejected": "b"}],
     "2: this line holds pairs, but {data}:1 holds answers"),
    ([{"prompt": "hi", "chosen": "a"}], "1: missing 'rejected'"),
    ([{"response": "a"}], "1: give the prompt as exactly one of"),
    (["{oops"], "1: invalid JSON"),
])
def test_score_names_the_bad_line_before_loading_anything(lines, message, tmp_path):
    data = write(tmp_path / "score.jsonl", lines)
    code, _, err = run("score", "nosuch@1", "--data", str(data), "--registry", str(tmp_path / "empty"))
    assert code == 2 and f"{data}:{message.format(data=data)}" in err, err


def test_scoring_with_a_generating_adapter_is_refused(sft_lora, registry, pairs):
    from adapterhub.objectives.scoring import RewardModel

    with pytest.raises(ConfigError, match=r"senti@1 is not a reward model \(objective 'sft'"):
        RewardModel.load(sft_lora, registry=str(registry))
    code, _, err = run("score", sft_lora, "--data", str(pairs), "--registry", str(registry))
    assert code == 2 and "is not a reward model" in err and "--objective reward" in err, err


def test_the_server_refuses_to_generate_with_a_reward_model_and_keeps_serving(reward_lora, sft_lora, registry,
                                                                              tiny_base_dir):
    import grpc
    from serve_helpers import running_server

    from adapterhub.serve.client import Client

    with running_server(tiny_base_dir, registry, quantize="none") as server:
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            for request in (["sentiment-rm"], [reward_lora], [sft_lora, reward_lora]):
                with pytest.raises(grpc.RpcError) as err:
                    client.generate("abc", adapters=request, max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "is a reward model (objective reward): it scores answers and does not generate" in \
                    err.value.details() and "adapterhub score" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                client.load(reward_lora)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert client.generate("abc", adapters=[sft_lora], max_new_tokens=2).completion_tokens == 2
            assert client.generate("abc", max_new_tokens=2).completion_tokens == 2


def test_the_fresh_head_comes_from_the_seed_not_from_when_the_base_loaded(tiny_base_dir):
    import torch

    from adapterhub.base import load_base
    from adapterhub.objectives.scoring import head_tensors, init_head
    from adapterhub.training import seed_everything

    heads = []
    for extra_draws in (0, 7):
        torch.rand(extra_draws)  # whatever ran before the base loaded
        model = load_base(tiny_base_dir, "none", head="sequence-classification").model
        seed_everything(3)
        init_head(model)
        heads.append(head_tensors(model)["score.weight"])
    assert torch.equal(heads[0], heads[1]) and 0.04 < float(heads[0].std()) < 0.12  # the tiny base's 0.08
