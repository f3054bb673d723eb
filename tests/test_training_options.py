"""Every training option takes effect in the Hugging Face Trainer run (LoRA on the tiny base).

Each test observes the option from inside the run (a TrainerCallback, the Trainer's log history,
files in the run directory, the saved adapter), never by reading the option back.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from adapterhub import ConfigError
from adapterhub.data import CausalCollator, TokenizedDataset
from adapterhub.training import TrainOptions, fit, seed_everything

LR = 5e-3


@pytest.fixture(scope="module")
def small_set(sentiment_dataset):
    return TokenizedDataset(sentiment_dataset.items[:32], "sentiment")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    from adapterhub.tasks import write_split

    return write_split("sentiment", tmp_path_factory.mktemp("opt-data"), n_train=16, n_test=4)


def lora():
    from adapterhub.manager import get_manager

    return get_manager().get_method("lora")


def run(base_dir, dataset, tokenizer, *, callbacks=(), eval_dataset=None, **values):
    """Attach a fresh LoRA adapter to a fresh tiny base and fit it with these options."""
    from adapterhub.base import load_base

    method = lora()
    config = method.make_config({})
    options = TrainOptions(**{"progress": False, "logging_steps": 1, "batch_size": 4, "lr": LR, "seed": 0, **values})
    seed_everything(options.seed)
    model = method.attach(load_base(base_dir, "none").model, config)
    return fit(method, model, config, dataset, options, eval_dataset=eval_dataset, tokenizer=tokenizer,
               callbacks=list(callbacks))


def train_logs(result) -> list[dict]:
    return [h for h in result.history if "loss" in h and "learning_rate" in h]


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def pipeline_run(base_dir, data, out, **values):
    """The CLI's own path (train_and_publish) without the subprocess."""
    from adapterhub.pipeline import train_and_publish

    top = {"base": str(base_dir), "data": str(data), "output": str(out), "no_publish": True,
           **{k: values.pop(k) for k in ("from_adapter",) if k in values}}
    set_values = values.pop("set", {})
    options = TrainOptions.from_dict({"progress": False, "logging_steps": 1, "batch_size": 4, "lr": LR, **values})
    return train_and_publish(lora(), lora().make_config(set_values), options, top)


def batch_loss(model, dataset, tokenizer) -> float:
    batch = CausalCollator(tokenizer.pad_token_id or 0)(list(dataset))
    with torch.no_grad():
        return float(model(**batch).loss)


# -- eval split / eval data / early stopping -----------------------------------------------------


def test_eval_split_holds_out_examples_and_reports_eval_loss(tiny_base_dir, data_files, tmp_path):
    outcome = pipeline_run(tiny_base_dir, data_files[0], tmp_path / "a", eval_split=0.25, max_steps=2)
    meta = json.loads((tmp_path / "a" / "adapterhub.json").read_text())
    assert (meta["training"]["examples"], meta["training"]["eval_examples"]) == (12, 4)
    assert math.isfinite(outcome.metrics["eval_loss"])


def test_eval_data_file_is_what_eval_loss_measures(tiny_base_dir, data_files, tmp_path, tiny_tokenizer):
    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import load_dataset

    eval_file = data_files[1]
    outcome = pipeline_run(tiny_base_dir, data_files[0], tmp_path / "a", eval_data=str(eval_file), max_steps=3,
                           batch_size=8)
    _, model = load_adapter(load_base(tiny_base_dir, "none").model, tmp_path / "a")
    expected = batch_loss(model.eval(), load_dataset(eval_file, tiny_tokenizer), tiny_tokenizer)
    assert outcome.metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_early_stopping_stops_on_a_plateau(tiny_base_dir, data_files, tmp_path):
    # lr so small the eval loss cannot move by the threshold: patience 2 stops at step 3 of 40
    outcome = pipeline_run(tiny_base_dir, data_files[0], tmp_path / "a", eval_data=str(data_files[1]), lr=1e-9,
                           max_steps=40, eval_steps=1, early_stopping_patience=2, early_stopping_threshold=1e-3)
    assert (outcome.metrics["global_step"], outcome.metrics["max_steps"]) == (3, 40)


# -- optimizer: layer-wise decay, accumulation, clipping, schedule -----------------------------


class RecordOptimizer(TrainerCallback):
    """Records each parameter's learning rate in the optimizer the Trainer actually steps."""

    def __init__(self, model):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.lr_by_name: dict[str, float] = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.lr_by_name[self.names[id(p)]] = group["lr"]


def test_layerwise_lr_decay_gives_lower_layers_a_smaller_lr(tiny_base_dir, small_set, tiny_tokenizer):
    from adapterhub.base import load_base

    seen = {}

    class Probe(RecordOptimizer):
        def on_train_end(self, *args, **kwargs):
            seen.update(self.lr_by_name)

    method = lora()
    config = method.make_config({})
    model = method.attach(load_base(tiny_base_dir, "none").model, config)
    options = TrainOptions(max_steps=1, lr=LR, batch_size=4, progress=False, layerwise_lr_decay=0.5)
    fit(method, model, config, small_set, options, tokenizer=tiny_tokenizer, callbacks=[Probe(model)])
    by_layer = {}
    for name, lr in seen.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        by_layer.setdefault(layer, set()).add(round(lr / LR, 6))
    assert by_layer == {0: {0.5}, 1: {1.0}}  # tiny base: 2 layers; the top keeps the full lr


class CountSteps(TrainerCallback):
    def __init__(self):
        self.optimizer_steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1


@pytest.mark.parametrize("grad_accum, steps", [(1, 4), (2, 2)])
def test_grad_accum_divides_optimizer_steps_per_epoch(tiny_base_dir, small_set, tiny_tokenizer, grad_accum, steps):
    counter = CountSteps()
    sixteen = TokenizedDataset(small_set.items[:16])
    result = run(tiny_base_dir, sixteen, tiny_tokenizer, epochs=1, batch_size=4, grad_accum=grad_accum,
                 callbacks=[counter])  # 16 examples, 4 per batch
    assert counter.optimizer_steps == result.metrics["global_step"] == steps


class GradNorms(TrainerCallback):
    """The gradient norm the optimizer is about to use (after the Trainer clipped it)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_gradient_clipping_bounds_the_gradient_the_optimizer_sees(tiny_base_dir, small_set, tiny_tokenizer):
    clipped, free = GradNorms(), GradNorms()
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=3, max_grad_norm=0.01, callbacks=[clipped])
    result = run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=3, max_grad_norm=0, callbacks=[free])
    assert max(clipped.norms) <= 0.01 * 1.001
    assert min(free.norms) > 0.05  # unclipped gradients are far larger, so the clip did the bounding
    assert [h["grad_norm"] for h in train_logs(result)] == pytest.approx(free.norms, rel=1e-4)


def test_warmup_makes_the_first_lr_smaller_than_the_peak(tiny_base_dir, small_set, tiny_tokenizer):
    warm = [h["learning_rate"] for h in train_logs(run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=4,
                                                       warmup_steps=3, scheduler="constant_with_warmup"))]
    assert warm == pytest.approx([0, LR / 3, 2 * LR / 3, LR])  # without warmup step 1 runs at LR (next test)


def test_scheduler_cosine_and_linear_follow_their_curves(tiny_base_dir, small_set, tiny_tokenizer):
    n = 4
    curves = {s: [h["learning_rate"] for h in train_logs(run(tiny_base_dir, small_set, tiny_tokenizer,
                                                               max_steps=n, scheduler=s))]
              for s in ("linear", "cosine")}
    # the lr logged at step k is the one used for it: k - 1 scheduler steps taken
    assert curves["linear"] == pytest.approx([LR * (1 - k / n) for k in range(n)])
    assert curves["cosine"] == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * k / n)) for k in range(n)])
    assert curves["linear"] != pytest.approx(curves["cosine"])


# -- memory, checkpoints, logs -----------------------------------------------------------------


def test_gradient_checkpointing_recomputes_the_forward_in_backward(tiny_base_dir, small_set, tiny_tokenizer):
    calls = {}

    class CountForwards(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            mlp = model.get_base_model().model.layers[0].mlp
            calls[self.key] = 0
            forward = mlp.forward

            def counted(*args, **kw):  # module hooks do not fire on torch's recompute, forward does
                calls[self.key] += 1
                return forward(*args, **kw)

            mlp.forward = counted

    on = run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=2, gradient_checkpointing=True,
             callbacks=[CountForwards("on")])
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=2, callbacks=[CountForwards("off")])
    assert calls == {"on": 4, "off": 2}  # one extra forward per step: the recompute
    assert any(float(p.abs().max()) > 0 for n, p in on.model.named_parameters() if "lora_B" in n)  # still learns


def test_resume_continues_from_the_checkpoint_global_step(tiny_base_dir, small_set, tiny_tokenizer, tmp_path):
    straight = run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=6)
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=6, save_steps=2, run_dir=str(tmp_path / "r"),
        callbacks=[StopAt(4)])
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    counter = CountSteps()
    resumed = run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=6, run_dir=str(tmp_path / "r"),
                  resume_from_checkpoint="last", callbacks=[counter])
    assert counter.optimizer_steps == 2  # steps 5 and 6 only
    assert [h["step"] for h in train_logs(resumed)] == [1, 2, 3, 4, 5, 6]  # history restored, then continued
    assert resumed.metrics["global_step"] == 6
    a, b = adapter_state(straight.model), adapter_state(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same result as never stopping


class StopAt(TrainerCallback):
    """Simulates an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from adapterhub.training import resolve_checkpoint

    with pytest.raises(ConfigError, match="no checkpoint-N directory"):
        resolve_checkpoint(TrainOptions(resume_from_checkpoint="last", run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a Trainer checkpoint"):
        resolve_checkpoint(TrainOptions(resume_from_checkpoint=str(tmp_path)))
    with pytest.raises(ConfigError, match="--run-dir"):
        TrainOptions(resume_from_checkpoint="last")


def test_tensorboard_writes_event_files_with_the_loss(tiny_base_dir, small_set, tiny_tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=3, tensorboard=True, run_dir=str(tmp_path / "tb"))
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=3, run_dir=str(tmp_path / "plain"))
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and not list((tmp_path / "plain").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_progress_bar_on_and_off(tiny_base_dir, small_set, tiny_tokenizer, capfd):
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=2, progress=True)
    shown = capfd.readouterr().err
    run(tiny_base_dir, small_set, tiny_tokenizer, max_steps=2, progress=False)
    hidden = capfd.readouterr().err
    assert "2/2" in shown and "2/2" not in hidden


# -- seed and continued training (through the pipeline the CLI uses) ---------------------------


def test_seed_fixes_adapter_init_and_data_order(tiny_base_dir, data_files, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        pipeline_run(tiny_base_dir, data_files[0], tmp_path / name, max_steps=2, seed=seed)
    a, b, c = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_from_adapter_starts_from_the_parent_weights(tiny_base_dir, data_files, tmp_path, tiny_tokenizer):
    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import load_dataset

    data = data_files[0]
    pipeline_run(tiny_base_dir, data, tmp_path / "parent", max_steps=8, batch_size=8)
    full_batch = {"max_steps": 1, "batch_size": 16}  # 16 lines: step 1's loss is the loss on all of them
    child = pipeline_run(tiny_base_dir, data, tmp_path / "child", from_adapter=str(tmp_path / "parent"), **full_batch)
    fresh = pipeline_run(tiny_base_dir, data, tmp_path / "fresh", **full_batch)

    examples = load_dataset(data, tiny_tokenizer)
    _, parent_model = load_adapter(load_base(tiny_base_dir, "none").model, tmp_path / "parent")
    parent_loss = batch_loss(parent_model.eval(), examples, tiny_tokenizer)
    base_loss = batch_loss(load_base(tiny_base_dir, "none").model.eval(), examples, tiny_tokenizer)
    first = {name: json.loads((tmp_path / name / "adapterhub.json").read_text()) for name in ("child", "fresh")}
    assert child.metrics["train_loss"] == pytest.approx(parent_loss, rel=1e-4)
    assert fresh.metrics["train_loss"] == pytest.approx(base_loss, rel=1e-4)  # a fresh LoRA starts at the base
    assert abs(parent_loss - base_loss) > 0.05
    assert first["child"]["parent"] == str(tmp_path / "parent") and first["fresh"]["parent"] is None


def test_from_adapter_refuses_a_conflicting_method_config(tiny_base_dir, data_files, tmp_path):
    pipeline_run(tiny_base_dir, data_files[0], tmp_path / "parent", max_steps=1)
    with pytest.raises(ConfigError, match="r differ"):
        pipeline_run(tiny_base_dir, data_files[0], tmp_path / "child", max_steps=1,
                     from_adapter=str(tmp_path / "parent"), set={"r": "4"})
    assert not (tmp_path / "child").exists()


def test_from_adapter_on_another_base_names_options_train_has(tiny_base_dir, data_files, tmp_path):
    """The advice used to name --allow-base-mismatch, which only merge takes (issue 32)."""
    from adapterhub.base import init_base
    from adapterhub.cli import build_parser
    from adapterhub.errors import BaseMismatch

    pipeline_run(tiny_base_dir, data_files[0], tmp_path / "parent", max_steps=1)
    other = init_base("tiny", tmp_path / "other-base", seed=1)
    with pytest.raises(BaseMismatch) as info:
        pipeline_run(other, data_files[0], tmp_path / "child", max_steps=1, from_adapter=str(tmp_path / "parent"))
    train_flags = build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
    named = re.findall(r"--[a-z][a-z-]+", str(info.value))
    assert named and all(flag in train_flags for flag in named), (named, str(info.value))


# -- validation and YAML precedence ------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": 1e-4}, "unknown training option.*'learning_rate'"),
        ({"lr": "fast"}, r"lr='fast' is not a valid float .*--lr"),
        ({"lr": -1}, r"lr=-1.0 must be a positive number"),
        ({"scheduler": "cosine_annealing"}, r"scheduler='cosine_annealing' must be one of .*cosine"),
        ({"grad_accum": "2.5"}, r"grad_accum='2.5' is not a valid int"),
        ({"layerwise_lr_decay": 1.5}, r"layerwise_lr_decay=1.5 must be in \(0, 1\]"),
        ({"early_stopping_patience": 2}, "early stopping needs eval data"),
        ({"eval_steps": 5}, "eval_steps=5 needs eval data"),
        ({"eval_split": 0.1, "eval_data": "x.jsonl"}, "exclusive"),
        ({"threads": 0}, r"threads=0 must be >= 1"),
    ],
)
def test_bad_options_are_clear_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainOptions.from_dict(values)


def parse_train(argv, tmp_path, yaml_text=None):
    from adapterhub.cli import build_parser, resolve_train_settings

    if yaml_text is not None:
        (tmp_path / "train.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "train.yaml"), *argv]
    return resolve_train_settings(build_parser().parse_args(["train", *argv]))


def test_yaml_values_apply_and_flags_override_them(tmp_path):
    yaml_text = ("plugin: lora\nbase: B\ndata: D\nno_publish: true\nlr: 0.001\nmax_steps: 7\n"
                 "tensorboard: true\nfrom: PARENT\nmethod_config:\n  r: 4\n  alpha: 8\n")
    top, method_values, options, _ = parse_train(["--lr", "0.01", "--no-tensorboard", "--set", "r=16"], tmp_path,
                                              yaml_text)
    resolved = TrainOptions.from_dict(options)
    assert (resolved.lr, resolved.max_steps, resolved.tensorboard) == (0.01, 7, False)
    assert method_values == {"r": "16", "alpha": 8}
    assert top["from_adapter"] == "PARENT" and top["plugin"] == "lora"


def test_unknown_yaml_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        parse_train([], tmp_path, "plugin: lora\nbase: B\ndata: D\nno_publish: true\nlearning_rate: 0.1\n")


def test_layerwise_lr_decay_finds_the_layers_and_embeddings_of_any_decoder():
    """GPT-2 names its layers ``transformer.h.N`` and its embeddings ``wte``: decay must still apply."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapterhub.manager import PluginManager
    from adapterhub.training import build_param_groups

    method = PluginManager(autoload=False).get_method("full")
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=2, vocab_size=320, n_positions=64))
    config = method.make_config({})
    model = method.attach(model, config)
    options = TrainOptions(lr=LR, layerwise_lr_decay=0.5)
    lr_of = {id(p): g["lr"] / LR for g in build_param_groups(method, model, config, options) for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["transformer.wte.weight"])] == 0.5**3
    assert lr_of[id(named["transformer.h.0.attn.c_attn.weight"])] == 0.5**2
    assert lr_of[id(named["transformer.h.2.mlp.c_proj.weight"])] == 1.0
    assert lr_of[id(named["transformer.ln_f.weight"])] == 1.0


def test_train_runs_on_the_threads_it_is_given(tiny_base_dir, sentiment_data, tmp_path):
    """``--threads`` (default 1: bench/train_threads.py) sets torch's CPU threads for the run, and is not
    recorded as a training option (it changes speed, not what is learned)."""
    import torch

    from adapterhub.cli import main

    torch.set_num_threads(2)
    registry = tmp_path / "registry"
    assert main(["train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
                 "--task", "t", "--registry", str(registry), "--max-steps", "1", "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
                 "--task", "t", "--registry", str(registry), "--max-steps", "1", "--no-progress", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    from adapterhub.registry import open_registry

    assert "threads" not in open_registry(registry).manifest("t@2").training
