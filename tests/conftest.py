"""Shared fixtures: one tiny base per session, small synthetic data, isolated plugin state."""

from __future__ import annotations

import os

os.environ.setdefault("ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD", "")  # tests that need it set it explicitly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_read_cache(tmp_path_factory):
    """Registry reads verify versions into a read cache (``$ADAPTERHUB_CACHE``): one per test session,
    inherited by the processes tests start, never the user's own ``~/.cache/adapterhub``."""
    previous = os.environ.get("ADAPTERHUB_CACHE")
    os.environ["ADAPTERHUB_CACHE"] = str(tmp_path_factory.mktemp("read-cache"))
    yield
    if previous is None:
        os.environ.pop("ADAPTERHUB_CACHE", None)
    else:
        os.environ["ADAPTERHUB_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny Llama base written by `adapterhub base init` (the same path users take)."""
    from adapterhub.base import init_base

    return init_base("tiny", tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def smollm2_base_dir(tmp_path_factory):
    """The real default base, SmolLM2-135M-Instruct, written by the preset once per session (~25 s)."""
    from adapterhub.base import init_base

    return init_base("smollm2-135m-instruct", tmp_path_factory.mktemp("base") / "smollm2")


@pytest.fixture(scope="session")
def mixed_world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    """A registry with LoRA (two tasks), bottleneck, IA3 and prefix adapters on the tiny base (see
    ``mixed_world.py``); shared by the server test modules, which leave it as they found it."""
    from mixed_world import build_mixed_world

    return build_mixed_world(tmp_path_factory.mktemp("serve"), tiny_base_dir, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from adapterhub.base import load_tokenizer

    return load_tokenizer(tiny_base_dir)


@pytest.fixture
def tiny_model(tiny_base_dir):
    """A fresh full-precision copy of the tiny base for each test (methods mutate models)."""
    from adapterhub.base import load_base

    return load_base(tiny_base_dir, "none").model


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory):
    from adapterhub.tasks import write_split

    return write_split("sentiment", tmp_path_factory.mktemp("data"), n_train=256, n_test=32)


@pytest.fixture(scope="session")
def sentiment_dataset(sentiment_data, tiny_tokenizer):
    from adapterhub.data import load_dataset

    return load_dataset(sentiment_data[0], tiny_tokenizer, max_length=64)


def _process_wide_manager(autoload: bool):
    from adapterhub.manager import PluginManager, reset_manager

    manager = PluginManager(autoload=autoload)
    reset_manager(manager)
    yield manager
    reset_manager(None)


@pytest.fixture
def plugin_manager():
    """A fresh process-wide plugin manager (built-ins only); restored afterwards so no plugin state leaks."""
    yield from _process_wide_manager(autoload=False)


@pytest.fixture
def installed_plugin_manager():
    """The process-wide manager with the installed entry-point plugins too (the example `loha`)."""
    yield from _process_wide_manager(autoload=True)


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only when asked for (``-m slow``): ``make test`` stays within CI's budget."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
