"""``train --on``: a top trained on a frozen published bottom, recorded, served with it, guarded.

On the tiny base with a real registry: a LoRA bottom (``shared@1``, tagged ``prod``) and a LoRA top
trained ``--on shared@prod`` through the CLI. The top's training forward (the bottom folded into
the base, the top on it) must equal the server's composition of the two; a real server must answer
``topic@1`` exactly as ``shared@1+topic@1``; what cannot be composed is refused by name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import chat, running_server

from adapterhub import hookimpl
from adapterhub.cli import main
from adapterhub.manager import PluginManager, reset_manager

STEPS = ("--max-steps", "4", "--batch-size", "4", "--lr", "2e-2", "--no-progress")


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir):
    """shared@1 (tag prod) trained on sentiment, topic@1 trained --on shared@prod."""
    from adapterhub.tasks import write_split

    work = tmp_path_factory.mktemp("shared-bottom")
    registry = work / "registry"
    data = {task: write_split(task, work / task, n_train=16, n_test=2)[0] for task in ("sentiment", "topic")}
    common = ("--base", str(tiny_base_dir), "--registry", str(registry), *STEPS)
    code, out, err = run_cli("train", "--plugin", "lora", "--data", str(data["sentiment"]), "--task", "shared", *common)
    assert code == 0, err
    assert run_cli("registry", "tag", "shared@1", "prod", "--registry", str(registry))[0] == 0
    probe = LogitsProbe(tiny_base_dir)
    manager = PluginManager(autoload=False)
    manager.register(probe, name="logits-probe")
    reset_manager(manager)
    try:
        code, out, err = run_cli("train", "--plugin", "lora", "--data", str(data["topic"]), "--task", "topic",
                                 "--on", "shared@prod", *common)
    finally:
        reset_manager(None)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "topic@1"
    return {"registry": registry, "data": data, "common": common, "work": work, "probe": probe}


class LogitsProbe:
    """A plugin whose trainer callback records the training model's last-token logits for one prompt
    when training starts (the top still zero: the bottoms alone) and when it ends."""

    PROMPT = "topic?\n\nthe team saw a goal"

    def __init__(self, base_dir):
        from adapterhub.base import load_tokenizer

        self.ids = load_tokenizer(base_dir)(self.PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.logits = {}

    @hookimpl
    def adapterhub_trainer_callbacks(self, method, options):
        from transformers import TrainerCallback

        probe = self

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                probe.record("begin", model)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                probe.record("end", model)

        return [Record()]

    def record(self, when, model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits[when] = model(input_ids=self.ids.to(model.device)).logits[0, -1].float().cpu()
        model.train(was_training)


def store_of(world):
    from adapterhub.registry import open_registry

    return open_registry(str(world["registry"]))


def copied_registry(world, tmp_path):
    """A copy of the world's registry for a test that adds or edits versions."""
    from adapterhub.registry import open_registry

    shutil.copytree(world["registry"], tmp_path / "registry")
    return open_registry(str(tmp_path / "registry"))


def rewrite_manifest(store, ref: str, change) -> None:
    """Edit a stored manifest in place, as a hand edit or a foreign import would (a new file: new stat)."""
    task, version = store.resolve(ref)
    path = store._manifest_path(task, version)
    data = json.loads(path.read_text())
    change(data)
    tmp = path.with_suffix(".edit")
    tmp.write_text(json.dumps(data))
    os.chmod(tmp, path.stat().st_mode)
    tmp.replace(path)


# -- the record ----------------------------------------------------------------------------------


def test_the_top_records_its_bottom_pinned_with_its_digest(world):
    store = store_of(world)
    shared, top = store.manifest("shared@1"), store.manifest("topic@1")
    assert [(r.ref, r.digest) for r in top.requires] == [("shared@1", shared.digest)], "the tag is pinned"
    assert store.manifest("shared@1").requires == ()
    code, out, _ = run_cli("registry", "show", "topic@1", "--registry", str(world["registry"]), "--json")
    assert code == 0 and json.loads(out)["requires"] == [{"ref": "shared@1", "digest": shared.digest}]
    code, out, _ = run_cli("registry", "list", "topic", "--registry", str(world["registry"]))
    assert code == 0 and "on shared@1" in out
    assert "requires" not in shared.to_dict(), "a manifest without requirements serializes as before"


def test_old_manifests_parse_and_keep_their_bytes(world):
    from adapterhub.registry.manifest import Manifest

    data = store_of(world).manifest("shared@1").to_dict()
    assert "requires" not in data
    again = Manifest.from_dict(json.loads(json.dumps(data)))
    assert again.requires == () and again.to_json() == Manifest.from_dict(data).to_json()
    assert "requires" not in json.loads(again.described_files()["adapterhub.json"])


# -- training equals serving -------------------------------------------------------------------


def test_the_training_forward_is_the_served_composition(world, tiny_base_dir):
    """The training model's own logits (recorded by a trainer callback in the run) are the server's:
    at the start, with the top still zero, those of ``shared@1`` alone; at the end those of
    ``topic@1``, which brings ``shared@1``. Without its bottom the top's logits are far from them."""
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.batch_plan import BatchPlan
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import AdapterSpec
    from adapterhub.serve.requires import with_bottoms

    probe = world["probe"]
    ids = probe.ids
    engine = Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(str(world["registry"])), capacity=4)

    def served(specs):
        adapters = with_bottoms([AdapterSpec(r, w) for r, w in specs], engine.cache.source)
        entries = [(engine.cache.acquire(spec.ref), spec.weight) for _, spec in adapters]
        try:
            plan = BatchPlan([entries], engine.pool, engine.device, backend=engine.backend)
            logits = engine.passes.forward(plan, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], None)
            return [s.ref for _, s in adapters], logits[0]
        finally:
            for entry, _ in entries:
                engine.cache.release(entry)

    try:
        refs, composed = served([("topic@1", 1.0)])
        assert refs == ["shared@1", "topic@1"]
        torch.testing.assert_close(composed, probe.logits["end"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(served([("shared@1", 1.0)])[1], probe.logits["begin"], rtol=1e-4, atol=1e-4)
        _, explicit = served([("shared@1", 1.0), ("topic@1", 1.0)])
        torch.testing.assert_close(explicit, composed, rtol=0, atol=0)
        _, half_bottom = served([("shared@1", 0.5), ("topic@1", 1.0)])  # a bottom the request names keeps its weight
        gap = (half_bottom - probe.logits["end"]).abs().max().item()
        assert gap > 100 * 1e-4, f"the bottom barely changes the logits ({gap}): the test could not tell"
    finally:
        engine.stop(grace=1)


@pytest.mark.parametrize("bottom", ["bitfit", "adalora", "sparse", "ia3", "dora"])
def test_foldable_bottom_says_whether_folding_is_what_the_server_composes(world, tiny_base_dir, tmp_path, bottom):
    """For a bottom of each method: topic@1's LoRA on the base with the bottom merged in, against the
    server composing the two. Equal (to rounding) exactly for the methods declaring foldable_bottom."""
    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.manager import get_manager
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.batch_plan import BatchPlan
    from adapterhub.serve.engine import Engine
    from adapterhub.stacking import fold_bottoms

    store = copied_registry(world, tmp_path)
    code, ref, err = run_cli("train", "--plugin", bottom, "--data", str(world["data"]["sentiment"]), "--task", bottom,
                             "--base", str(tiny_base_dir), "--registry", store.location, "--max-steps", "3",
                             "--batch-size", "4", "--lr", "5e-2", "--no-progress")
    assert code == 0, err
    ref = ref.strip().splitlines()[-1]
    ids = world["probe"].ids
    base = load_base(tiny_base_dir, "none")
    fold_bottoms(base, [store.manifest(ref)], store.location)
    _, folded = load_adapter(base.model, store.materialize("topic@1"))
    with torch.no_grad():
        expected = folded(input_ids=ids).logits[0, -1].float()
    engine = Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(store.location), capacity=4)
    entries = [(engine.cache.acquire(r), 1.0) for r in (ref, "topic@1")]
    try:
        plan = BatchPlan([entries], engine.pool, engine.device, backend=engine.backend)
        served = engine.passes.forward(plan, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], None)[0]
    finally:
        for entry, _ in entries:
            engine.cache.release(entry)
        engine.stop(grace=1)
    gap = (served - expected).abs().max().item()
    if get_manager().get_method(bottom).foldable_bottom:
        assert gap < 1e-4, f"{bottom} declares foldable_bottom, but folding it differs from the server by {gap}"
    else:
        assert gap > 1e-3, f"{bottom} folds as the server composes it ({gap}): declare foldable_bottom = True"


def test_a_server_answers_the_top_as_the_explicit_composition(world, tiny_base_dir):
    with running_server(tiny_base_dir, world["registry"], quantize="none", http_port=0, served_model_name="tiny",
                        max_new_tokens=16) as server, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        messages = [{"role": r, "content": c} for r, c in chat("the team saw a goal")]

        def ask(model):
            reply = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12,
                                                            "temperature": 0})
            assert reply.status_code == 200, reply.text
            return reply.json()

        top, explicit = ask("topic@1"), ask("shared@1+topic@1")
        assert top["model"] == explicit["model"] == "shared@1+topic@1"
        assert top["choices"][0]["message"]["content"] == explicit["choices"][0]["message"]["content"]
        from adapterhub.serve.client import Client

        with Client(f"127.0.0.1:{server.port}", timeout=120) as grpc_client:
            prompt = chat("the team saw a goal")
            alone = grpc_client.generate(messages=prompt, adapters=["topic@1"], max_new_tokens=12)
            both = grpc_client.generate(messages=prompt, adapters=["shared@1", "topic@1"], max_new_tokens=12)
        assert list(alone.token_ids) == list(both.token_ids) and len(alone.token_ids) > 0
        assert [(a.requested, a.resolved) for a in alone.adapters] == [("shared@1", "shared@1"), ("topic@1", "topic@1")]
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert models["topic@1"]["requires"] == ["shared@1"] and "requires" not in models["shared@1"]


def test_merge_writes_the_top_with_its_bottom_in_it(world, tiny_base_dir, tmp_path):
    """``adapterhub merge topic@1`` writes the model the top was trained in: base + shared@1 + topic@1."""
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli("merge", "topic@1", "--base", str(tiny_base_dir), "--out", str(tmp_path / "merged"),
                           "--registry", str(world["registry"]), "--dtype", "float32")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=world["probe"].ids).logits[0, -1]
    torch.testing.assert_close(logits, world["probe"].logits["end"], rtol=1e-4, atol=1e-4)


def test_a_distill_teacher_trained_on_a_bottom_teaches_with_it(world, tiny_base_dir):
    """teacher=topic@1 is the model topic@1 was trained in (its bottom folded in), not topic@1 alone."""
    from adapterhub.base import load_base
    from adapterhub.objectives.distill import load_teacher, resolve_teacher

    teacher = resolve_teacher("topic@1", str(world["registry"]))
    assert [m.ref for m in teacher.bottoms] == ["shared@1"] and teacher.lineage()["on"] == ["shared@1"]
    model = load_teacher(teacher, load_base(tiny_base_dir, "none"))
    with torch.no_grad():
        logits = model(input_ids=world["probe"].ids).logits[0, -1].float()
    torch.testing.assert_close(logits, world["probe"].logits["end"], rtol=1e-4, atol=1e-4)


def test_a_fleet_keys_the_top_by_its_bottom_too(world):
    """The Ray ingress pins ``topic@1`` to what the replica will apply: its bottom, then itself."""
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.affinity import pin

    source = AdapterSource(str(world["registry"]))
    top, explicit = pin([("topic@1", 1.0)], source), pin([("shared@1", 1.0), ("topic@1", 1.0)], source)
    assert top.adapters == explicit.adapters == (("shared@1", 1.0), ("topic@1", 1.0)) and top.key == explicit.key
    assert pin([("topic@1", 1.0)], source).key != pin([("shared@1", 0.5), ("topic@1", 1.0)], source).key


def test_importing_a_top_needs_its_bottom_there_first(world, tmp_path):
    from adapterhub.errors import NotFound
    from adapterhub.registry import open_registry
    from adapterhub.registry.transfer import export_dir

    store = store_of(world)
    export_dir(store, "topic@1", tmp_path / "topic")
    elsewhere = open_registry(str(tmp_path / "elsewhere"))
    with pytest.raises(NotFound, match="requires shared@1, which is not in registry"):
        elsewhere.publish("topic", tmp_path / "topic")
    export_dir(store, "shared@1", tmp_path / "shared")
    assert elsewhere.publish("shared", tmp_path / "shared").ref == "shared@1"
    assert [r.ref for r in elsewhere.publish("topic", tmp_path / "topic").requires] == ["shared@1"]


# -- refusals ----------------------------------------------------------------------------------


def test_training_refuses_bottoms_it_cannot_stack_on_before_the_base_loads(world, tmp_path):
    from serve_helpers import publish_copy

    store = copied_registry(world, tmp_path)
    source = store.materialize("shared@1")
    freeze = publish_copy(store, "frozen", source, tmp_path, method="freeze")  # composable: no
    prefix = publish_copy(store, "pre", source, tmp_path, method="prefix")  # composable, not mergeable
    ia3 = publish_copy(store, "scales", source, tmp_path, method="ia3")  # mergeable, folds into another model
    train = ("train", "--plugin", "lora", "--data", str(world["data"]["topic"]), "--task", "t2", "--base",
             str(tmp_path / "no-such-base"), "--registry", store.location, *STEPS)
    for on, words in [("nothing@1", "--on nothing@1: nothing@1 does not exist"), ("shared@7", "shared@7 does not exist"),
                      (freeze, "server cannot compose"), (prefix, "cannot merge"),
                      (ia3, "foldable_bottom: no")]:
        code, _, err = run_cli(*train, "--on", on)  # a base that does not exist: any load would fail otherwise
        assert code == 2 and words in err and on.partition("@")[0] in err, err
    code, _, err = run_cli(*train, "--on", "shared@1", "--plugin", "freeze")
    assert code == 2 and "'freeze' cannot be composed" in err, err
    code, _, err = run_cli(*train, "--on", "shared@1", "--quantize", "nf4")
    assert code == 2 and "--quantize none" in err, err
    code, _, err = run_cli(*train, "--from", "topic@1", "--on", freeze)
    assert code == 2 and "trained on top of shared@1" in err, err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))
    reward = [a if a != str(world["data"]["topic"]) else str(pairs) for a in train]
    code, _, err = run_cli(*reward, "--objective", "reward", "--on", "shared@1")
    assert code == 2 and "objective 'reward'" in err and "drop --on" in err, err
    yaml_file = tmp_path / "on.yaml"
    yaml_file.write_text("on: shared@1\n")
    code, _, err = run_cli(*train, "--config", str(yaml_file))
    assert code == 2 and "on_adapter" in err, err


def test_serving_refuses_broken_stacks_by_name(world, tmp_path):
    from serve_helpers import publish_copy

    from adapterhub.errors import ConfigError, NotFound
    from adapterhub.registry.requires import bottoms
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.requests import AdapterSpec
    from adapterhub.serve.requires import with_bottoms

    store = copied_registry(world, tmp_path)
    shared = store.manifest("shared@1")
    source_dir = store.materialize("topic@1")
    names = {kind: publish_copy(store, f"broken-{kind}", source_dir, tmp_path, requires=[])
             for kind in ("missing", "changed", "cycle", "frozen", "otherbase")}
    frozen_bottom = publish_copy(store, "frozen-bottom", store.materialize("shared@1"), tmp_path, method="freeze")
    other_base = publish_copy(store, "other-base", store.materialize("shared@1"), tmp_path,
                              base={"name": "other", "fingerprint": "sha256:" + "0" * 64})

    def require(ref, digest):
        return lambda data: data.__setitem__("requires", [{"ref": ref, "digest": digest}])

    rewrite_manifest(store, names["missing"], require("shared@9", shared.digest))
    rewrite_manifest(store, names["changed"], require("shared@1", "f" * 64))
    rewrite_manifest(store, names["cycle"], require(names["cycle"], store.manifest(names["cycle"]).digest))
    rewrite_manifest(store, names["frozen"], require(frozen_bottom, store.manifest(frozen_bottom).digest))
    rewrite_manifest(store, names["otherbase"], require(other_base, store.manifest(other_base).digest))
    source = AdapterSource(store.location)
    cases = [("missing", NotFound, "requires shared@9, which is not in registry"),
             ("changed", ConfigError, "is another adapter"),
             ("cycle", ConfigError, "form a cycle"),
             ("frozen", ConfigError, f"its bottom {frozen_bottom} is a 'freeze' adapter"),
             ("otherbase", ConfigError, "trained on another base")]
    for kind, error, words in cases:
        with pytest.raises(error, match=words) as caught:
            with_bottoms([AdapterSpec(names[kind])], source)
        assert names[kind] in str(caught.value)
    assert bottoms(store, store.manifest("topic@1")) == [shared]
    # a bottom with a bottom of its own: both come, deepest first, each once
    mid = publish_copy(store, "mid", store.materialize("shared@1"), tmp_path, requires=[shared.requirement().to_dict()])
    upper = publish_copy(store, "upper", source_dir, tmp_path, requires=[store.manifest(mid).requirement().to_dict()])
    assert [spec.ref for _, spec in with_bottoms([AdapterSpec(upper)], source)] == ["shared@1", mid, upper]
    assert [spec.ref for _, spec in with_bottoms([AdapterSpec(upper), AdapterSpec("topic@1")], source)] == \
        ["shared@1", mid, upper, "topic@1"]


def test_rm_refuses_a_bottom_a_published_top_requires(world, tmp_path):
    """rm of shared@1 is refused while topic@1 needs it; --force removes it, warns, and the top then
    fails to load with an error naming the bottom and the fix."""
    from adapterhub.errors import NotFound
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.requests import AdapterSpec
    from adapterhub.serve.requires import with_bottoms

    registry = copied_registry(world, tmp_path).location
    code, _, err = run_cli("registry", "rm", "shared@1", "--registry", str(registry))
    assert code == 2 and "required by topic@1" in err, err
    code, _, err = run_cli("registry", "rm", "shared@1", "--registry", str(registry), "--force")
    assert code == 0 and "topic@1 required shared@1" in err, err
    with pytest.raises(NotFound, match="topic@1 requires shared@1, which is not in registry"):
        with_bottoms([AdapterSpec("topic@1")], AdapterSource(registry))
