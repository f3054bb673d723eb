"""The key a fleet routes by (``serve/affinity.py``) and Ray as an optional extra; no Ray needed.

Adapters are small numpy-written directories (``registry_helpers``): the key reads manifests only.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from registry_helpers import make_adapter

from adapterhub.errors import ConfigError, NotFound

BASE = ("tiny-base", "/bases/tiny")


@pytest.fixture
def world(tmp_path):
    from adapterhub.registry import open_registry
    from adapterhub.serve.adapter_source import AdapterSource

    store = open_registry(tmp_path / "registry")
    for task, seed in [("a", 1), ("a", 2), ("b", 3), ("twin", 1)]:  # twin@1: a@1's bytes under another name
        store.publish(task, make_adapter(tmp_path / f"{task}-{seed}", seed=seed))
    store.set_tag("a@1", "prod")
    return store, AdapterSource(tmp_path / "registry")


def test_the_key_names_weights_not_names(world):
    from adapterhub.serve.affinity import pin

    store, source = world
    key = {name: pin(adapters, source) for name, adapters in {
        "a@1": [("a@1", 1.0)], "a@prod": [("a@prod", 1.0)], "a@2": [("a@2", 1.0)], "a": [("a", 1.0)],
        "twin@1": [("twin@1", 1.0)], "a@1:0": [("a@1", 0.0)], "a@1:0.5": [("a@1", 0.5)],
        "a@1+b@1": [("a@1", 1.0), ("b@1", 1.0)], "b@1+a@1": [("b@1", 1.0), ("a@1", 1.0)],
    }.items()}
    assert key["a@prod"].adapters == (("a@1", 1.0),) and key["a@prod"].key == key["a@1"].key
    assert key["a"].adapters == (("a@2", 1.0),) and key["a"].key == key["a@2"].key != key["a@1"].key
    assert key["twin@1"].key == key["a@1"].key and key["twin@1"].adapters == (("twin@1", 1.0),)  # same bytes
    assert key["a@1:0"].key == key["a@1"].key  # the engine reads a zero weight as 1
    assert key["a@1:0.5"].key != key["a@1"].key
    assert key["a@1+b@1"].key != key["b@1+a@1"].key  # bottleneck adapters apply in order
    assert len(key["a@1"].key) == 64 and pin([], source).key == ""


def test_a_moved_tag_moves_the_key(world):
    from adapterhub.serve.affinity import pin

    store, source = world
    before = pin([("a@prod", 1.0)], source)
    store.set_tag("a@2", "prod")
    after = pin([("a@prod", 1.0)], source)
    assert after.adapters == (("a@2", 1.0),) and after.key == pin([("a@2", 1.0)], source).key != before.key


def test_the_method_config_is_part_of_the_key(world, tmp_path):
    from adapterhub.serve.affinity import pin

    store, source = world
    other = make_adapter(tmp_path / "a-config", seed=1)  # a@1's files, another lora_alpha
    meta = json.loads((other / "adapterhub.json").read_text())
    meta["method_config"]["lora_alpha"] = 16
    (other / "adapterhub.json").write_text(json.dumps(meta))
    ref = store.publish("alpha", other).ref
    assert pin([(ref, 1.0)], source).key != pin([("a@1", 1.0)], source).key


def test_a_body_is_rewritten_to_the_versions_it_resolved(world):
    from adapterhub.serve.affinity import composition, pin, pin_body

    _, source = world
    chat = {"model": "a@prod + b@1:0.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    body, pinned = pin_body("/v1/chat/completions", json.dumps(chat).encode(), BASE, source)
    assert json.loads(body) == {**chat, "model": "a@1+b@1:0.5"}
    assert pinned == pin([("a@1", 1.0), ("b@1", 0.5)], source)
    assert composition([("a@1", 1 / 3)]) == f"a@1:{1 / 3!r}"  # a weight reads back as the same float

    listed = {"model": BASE[0], "prompt": "hi", "adapters": [{"ref": "a@prod"}, {"ref": "b", "weight": 2.0}]}
    body, pinned = pin_body("/v1/completions", json.dumps(listed).encode(), BASE, source)
    assert json.loads(body)["adapters"] == [{"ref": "a@1", "weight": 1.0}, {"ref": "b@1", "weight": 2.0}]
    assert json.loads(body)["model"] == BASE[0] and pinned.refs == ("a@1", "b@1")

    base = json.dumps({"model": BASE[1], "prompt": "hi"}).encode()
    assert pin_body("/v1/completions", base, BASE, source) == (base, pin([], source))


def test_bodies_the_door_refuses_are_not_pinned(world):
    from pydantic import ValidationError

    from adapterhub.serve.affinity import pin_body

    _, source = world
    with pytest.raises(ValidationError):
        pin_body("/v1/completions", b'{"model": "a@1", "prompt": "hi", "best_of": 3, "typo": 1}', BASE, source)
    with pytest.raises(NotFound):
        pin_body("/v1/completions", b'{"model": "a@9", "prompt": "hi"}', BASE, source)
    with pytest.raises(ValueError):
        pin_body("/v1/completions", b"{not json", BASE, source)


def test_ray_is_an_optional_extra(monkeypatch, tmp_path, capsys):
    """Without ray, ``import adapterhub`` and the CLI work, and ``serve --ray`` names the extra."""
    code = ("import sys, adapterhub, adapterhub.cli; adapterhub.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    from adapterhub.cli import main

    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")] + ["ray", "ray.serve"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    assert main(["serve", "--ray", "--base", str(tmp_path), "--registry", str(tmp_path)]) == ConfigError.exit_code
    assert "pip install 'adapterhub[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--replicas", "0"], "--replicas 0: give at least 1"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "terminate TLS in front of it"),
    (["--metrics-port", "9100"], "Ray's metrics export"),
])
def test_what_ray_cannot_do_is_refused_before_a_cluster_starts(tmp_path, capsys, flags, words):
    from adapterhub.cli import main

    assert main(["serve", "--ray", "--base", str(tmp_path), "--registry", str(tmp_path)] + flags) == ConfigError.exit_code
    assert words in capsys.readouterr().err
