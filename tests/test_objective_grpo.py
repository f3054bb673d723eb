"""The ``grpo`` objective and its rewards: online RL on the tiny base, rewards resolved before it loads.

Training runs are real (TRL's GRPOTrainer sampling with transformers ``generate``, a few dozen
steps on the tiny random base) and publish to a registry in a temp dir. The reward the tiny model
learns is the share of lowercase letters in its answer: dense enough for a random byte-level
model to move within seconds, and verifiable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from objective_helpers import run, write

from adapterhub.errors import ConfigError
from adapterhub.rewards import json_answer, keyword, max_words, resolve_reward, resolve_rewards

REWARD_MODULE = '''
def lowercase(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum("a" <= ch <= "z" for ch in t) / max(1, len(t)) for t in texts]

not_a_function = 3

SEEN = []


def record_answers(completions, answer=None, **kwargs):
    """Keeps the ``answer`` column it is given, row by row (the test reads SEEN)."""
    SEEN.extend(answer or [None] * len(completions))
    return [0.0] * len(completions)
'''


def train(base: Path, registry: Path, *args: str) -> str:
    code, out, err = run("train", "--base", str(base), "--registry", str(registry), "--no-progress", "--seed", "0",
                         "--plugin", "lora", *args)
    assert code == 0, err
    return out.strip().splitlines()[-1]


def manifest(registry: Path, ref: str):
    from adapterhub.registry import open_registry

    return open_registry(str(registry)).manifest(ref)


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory) -> Path:
    """``grpo_test_rewards.py`` importable for the whole module (as an installed module would be)."""
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "grpo_test_rewards.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(folder))
    yield folder / "grpo_test_rewards.py"
    sys.path.remove(str(folder))
    sys.modules.pop("grpo_test_rewards", None)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": f"say something {i}"}
                                                                        for i in range(32)])


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def grpo_lora(tiny_base_dir, prompts, registry, reward_module) -> str:
    return train(tiny_base_dir, registry, "--objective", "grpo", "--objective-set",
                 "reward=grpo_test_rewards:lowercase", "--objective-set", "max_completion_length=16", "--data", str(prompts), "--task", "lower",
                 "--max-steps", "24", "--lr", "2e-2", "--batch-size", "8", "--logging-steps", "4")


# -- grpo learns, records what rewarded it, and the adapter serves ------------------------------


def test_grpo_raises_the_reward_and_records_the_reward_it_used(grpo_lora, registry, reward_module):
    m = manifest(registry, grpo_lora)
    assert m.method == "lora"
    objective = m.training["objective"]
    assert objective["name"] == "grpo"
    assert objective["config"]["reward"] == "grpo_test_rewards:lowercase"
    assert objective["rewards"] == [f"grpo_test_rewards:lowercase ({reward_module})"]
    assert objective["reference"].startswith("none (beta=0")
    first, last = m.metrics["train_reward_start"], m.metrics["train_reward_end"]
    assert first < 0.3 and last > first + 0.2, (first, last)  # a random byte model starts near 26/260 lowercase


def test_the_grpo_adapter_loads_like_any_lora_and_answers_held_out_prompts_better(grpo_lora, registry,
                                                                                  tiny_base_dir, tiny_tokenizer):
    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.generation import generate_texts
    from adapterhub.adapters import resolve_adapter_dir

    from grpo_test_rewards import lowercase

    held_out = [[{"role": "user", "content": f"tell me about {w}"}] for w in ("cats", "rain", "maps", "tea")]
    before = lowercase(generate_texts(load_base(tiny_base_dir, "none").model, tiny_tokenizer, held_out,
                                      max_new_tokens=16))
    directory, _ = resolve_adapter_dir(grpo_lora, str(registry))
    method, model = load_adapter(load_base(tiny_base_dir, "none").model, directory)
    assert method.name == "lora"
    after = lowercase(generate_texts(model, tiny_tokenizer, held_out, max_new_tokens=16))
    assert sum(after) / 4 > sum(before) / 4 + 0.2, (before, after)


def test_beta_uses_the_base_as_reference_for_peft_and_is_refused_without_it(tiny_base_dir, prompts, tmp_path,
                                                                            reward_module):
    out = tmp_path / "adapter"
    common = ["--objective", "grpo", "--objective-set", "reward=grpo_test_rewards:lowercase", "--objective-set",
              "beta=0.1", "--objective-set", "max_completion_length=4", "--data", str(prompts), "--max-steps", "2"]
    train(tiny_base_dir, tmp_path / "reg", *common, "--no-publish", "--output", str(out))
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["training"]["objective"]["reference"] == "the base with the adapter disabled"
    assert not (out / "ref").exists()  # TRL's copy of the starting adapter is dropped, not saved
    code, _, err = run("train", "--base", str(tiny_base_dir), "--plugin", "adapter", "--no-publish", *common)
    assert code == 2 and "beta=0.1 needs a reference model" in err and "Use beta=0" in err, err


def test_a_batch_that_does_not_hold_whole_groups_is_refused(tiny_base_dir, prompts, tmp_path, reward_module):
    code, _, err = run("train", "--base", str(tiny_base_dir), "--plugin", "lora", "--objective", "grpo",
                       "--objective-set", "reward=grpo_test_rewards:lowercase", "--data", str(prompts),
                       "--batch-size", "6", "--no-publish", "--max-steps", "1")
    assert code == 2 and "--batch-size 6 x --grad-accum 1 must be a multiple of num_generations=4" in err, err


# -- a reward model adapter as the reward ---------------------------------------------------------


def test_a_reward_adapter_scores_the_samples(tiny_base_dir, prompts, registry, tmp_path):
    """A reward model trained to prefer lowercase answers drives GRPO; the lineage pins its version."""
    pytest.importorskip("adapterhub.objectives.scoring", reason="the reward-model scorer is not in this checkout")
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": f"say something {i}", "chosen": "hello there friend",
                                              "rejected": f"#{i}!? 0X{i}Z!"} for i in range(16)])
    rm = train(tiny_base_dir, registry, "--objective", "reward", "--data", str(pairs), "--task", "lower-rm",
               "--max-steps", "12", "--lr", "5e-3")
    ref = train(tiny_base_dir, registry, "--objective", "grpo", "--objective-set", "reward=adapter:lower-rm@latest",
                "--objective-set", "max_completion_length=8", "--data", str(prompts), "--task", "lower-by-rm",
                "--max-steps", "2", "--logging-steps", "1")
    m = manifest(registry, ref)
    assert m.training["objective"]["rewards"] == [f"adapter {rm} (resolved from lower-rm@latest)"]
    assert isinstance(m.metrics["train_reward_start"], float)


def test_an_adapter_that_is_not_a_reward_model_is_refused_before_the_base_loads(tiny_base_dir, prompts, tmp_path):
    from adapterhub.tasks import write_split

    sft_data, _ = write_split("sentiment", tmp_path / "sft", n_train=8, n_test=1)
    reg = tmp_path / "reg"
    sft = train(tiny_base_dir, reg, "--data", str(sft_data), "--task", "senti", "--max-steps", "1")
    with pytest.raises(ConfigError, match=rf"adapter:senti@1 \({sft}\) is not a reward model \(objective 'sft'"):
        resolve_rewards("adapter:senti@1", registry=str(reg))


# -- reward specs and data, checked before the base loads -----------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("", "grpo needs a reward: --objective-set reward=NAME"),
    ("no_such_reward", "reward 'no_such_reward' is neither a built-in nor an entry point in group "
                       "'adapterhub.rewards'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("grpo_test_rewards:missing", "module 'grpo_test_rewards' has no attribute 'missing'"),
    ("grpo_test_rewards:not_a_function", "has a non-callable 'not_a_function'"),
    ("json_answer,,max_words", "has an empty entry"),
    ("adapter:nope@1", "reward adapter:nope@1:"),
    ("adapter:", "names no adapter"),
])
def test_a_bad_reward_spec_is_refused_before_the_base_loads(spec, message, tmp_path, prompts, reward_module):
    missing_base = tmp_path / "no-base-here"  # the reward is checked first: the base is never looked at
    code, _, err = run("train", "--plugin", "lora", "--objective", "grpo", "--objective-set", f"reward={spec}",
                       "--base", str(missing_base), "--data", str(prompts), "--task", "t",
                       "--registry", str(tmp_path / "reg"))
    assert code == 2 and message in err and "no-base-here" not in err, err


@pytest.mark.parametrize("line, message", [
    ({"prompt": ""}, "'prompt' is empty"),
    ({"keyword": "x"}, "give the prompt as exactly one of"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "last turn must be from the user"),
    ("{nope", "invalid JSON"),
])
def test_a_bad_data_line_names_file_and_line_before_the_base_loads(line, message, tmp_path):
    data = write(tmp_path / "data.jsonl", [{"prompt": "fine"}, line])
    code, _, err = run("train", "--plugin", "lora", "--objective", "grpo", "--objective-set", "reward=max_words",
                       "--base", str(tmp_path / "no-base-here"), "--data", str(data), "--task", "t",
                       "--registry", str(tmp_path / "reg"))
    assert code == 2 and f"{data}:2: " in err and message in err, err


def test_a_column_a_built_in_reward_reads_must_be_on_every_line(tiny_base_dir, tmp_path):
    data = write(tmp_path / "data.jsonl", [{"prompt": "say cat", "keyword": "cat"}, {"prompt": "say dog"}])
    code, _, err = run("train", "--plugin", "lora", "--objective", "grpo", "--objective-set", "reward=keyword",
                       "--base", str(tiny_base_dir), "--data", str(data), "--no-publish", "--batch-size", "4")
    assert code == 2 and "example 2 has no 'keyword' column, which the keyword reward reads" in err, err


def test_a_column_only_later_lines_carry_reaches_the_reward(tiny_base_dir, tmp_path, reward_module):
    """``Dataset.from_list`` takes its columns from the first row: an ``answer`` that line 1 lacks
    would reach no reward at all. Every column any line has reaches it (None where a line lacks it)."""
    import grpo_test_rewards

    from adapterhub.base import load_base
    from adapterhub.manager import PluginManager
    from adapterhub.objective import TrainingJob
    from adapterhub.training import TrainOptions

    rows = [{"prompt": "say a"}] + [{"prompt": f"say {i}", "answer": f"a{i}"} for i in range(7)]
    data = write(tmp_path / "data.jsonl", rows)
    manager = PluginManager(autoload=False)
    method, objective = manager.get_method("lora"), manager.get_objective("grpo")
    grpo_test_rewards.SEEN.clear()
    job = TrainingJob(method=method, method_config=method.make_config({}), base=load_base(tiny_base_dir, "none"),
                      config=objective.make_config({"reward": "grpo_test_rewards:record_answers",
                                                    "max_completion_length": 4, "num_generations": 2}),
                      rows=objective.read_data(data),
                      options=TrainOptions(max_steps=2, batch_size=8, progress=False, seed=0, eval_split=0.0))
    objective.train(job)
    assert grpo_test_rewards.SEEN, "the reward never ran"
    assert {f"a{i}" for i in range(7)} <= set(grpo_test_rewards.SEEN), grpo_test_rewards.SEEN
    assert None in grpo_test_rewards.SEEN  # line 1's row: the column is there, empty


# -- resolution -----------------------------------------------------------------------------------


def test_module_function_file_path_and_builtins_resolve_with_descriptions(reward_module):
    function, description = resolve_reward("grpo_test_rewards:lowercase")
    assert function(["abc", "ABC"]) == [1.0, 0.0] and description.startswith("grpo_test_rewards:lowercase (")
    function, description = resolve_reward(f"{reward_module}:lowercase")
    assert function([[{"role": "assistant", "content": "ab1!"}]]) == [0.5]
    assert description == f"{reward_module.resolve()}:lowercase"
    rewards = resolve_rewards("json_answer, 2.5*max_words")
    assert [(r.description, r.weight) for r in rewards] == [("built-in json_answer", 1.0),
                                                            ("2.5 x built-in max_words", 2.5)]
    with pytest.raises(ConfigError, match="the weight before '\\*' must be a number, e.g. 2\\*keyword"):
        resolve_rewards("two*keyword")


def test_an_entry_point_in_the_rewards_group_resolves(tmp_path, monkeypatch):
    """A third party publishes ``[project.entry-points."adapterhub.rewards"]``; an installed
    distribution is a ``.dist-info`` folder on sys.path, which is what this test writes."""
    (tmp_path / "shout_rewards.py").write_text("def shout(completions, **kw):\n    return [1.0] * len(completions)\n")
    info = tmp_path / "shout_rewards-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-rewards\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[adapterhub.rewards]\nshout = shout_rewards:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    function, description = resolve_reward("shout")
    assert function(["a", "b"]) == [1.0, 1.0]
    assert description == "entry point shout = shout_rewards:shout (shout-rewards 1.2)"
    sys.modules.pop("shout_rewards", None)


# -- built-in rewards -----------------------------------------------------------------------------


def test_json_answer_gives_full_partial_and_no_credit():
    texts = ['{"answer": "Paris"}', 'Sure: {"answer": 3}', '{"city": "Paris"}', "{answer: Paris}", "Paris", ""]
    assert json_answer(texts) == [1.0, 0.5, 0.5, 0.2, 0.0, 0.0]
    assert json_answer([[{"role": "assistant", "content": ' {"answer": 1} '}]]) == [1.0]


def test_max_words_reads_its_limit_from_the_data_and_keyword_matches_whole_words():
    assert max_words(["one two", "one two three four", ""], max_words=[2, 2, 2]) == [1.0, 0.5, 0.0]
    assert max_words(["w " * 20]) == [0.5]  # default limit 10
    assert keyword(["The capital is Paris.", "Parisian", "cat and dog"], keyword=["paris", "paris", ["cat", "cow"]]) \
        == [1.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="keyword reward reads a 'keyword' column"):
        keyword(["x"])
