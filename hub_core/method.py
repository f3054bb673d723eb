"""The method contract: what every fine-tuning method plugin provides.

A method is a small object with a name, a config class, capability flags and five operations
(train, save, load, merge, unmerge), plus an optional serving form that lets the server apply its
adapter per row of a mixed batch. The host never branches on a method's name: everything that
differs between methods lives behind this interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager

from .config import MethodConfig
from .errors import NotMergeable

if TYPE_CHECKING:
    import torch.nn as nn

    from .adapter_files import AdapterFiles
    from .serving_forms import ServingForm
    from .training import TrainOptions, TrainResult


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method can do; shown by ``adapterhub plugins`` and used by the server.

    Each flag is checked against what the method does by the contract tests
    (``tests/test_method_contract.py``), for built-in and third-party methods alike.
    """

    mergeable: bool = False
    """``merge`` folds the adapter into the base weights (and ``unmerge`` undoes it); without it both
    raise ``NotMergeable``."""
    quantized_base: bool = False
    """Trains and loads on a bitsandbytes 4-/8-bit base; without it ``attach`` and ``load`` refuse
    one with a ``ConfigError``."""
    mixed_batch: bool = False
    """:meth:`Method.serving_form` returns a form of a kind the server applies, so the server batches
    the adapter with others row by row; without it, no form (the one-at-a-time path)."""
    composable: bool = False
    """The server composes the adapter with other adapters in one request (so it needs
    ``mixed_batch``: the one-at-a-time path serves an adapter alone)."""

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


class Method:
    """Base class of every fine-tuning method.

    Subclasses set ``name``, ``config_class``, ``capabilities`` and ``description`` and implement
    :meth:`attach`, :meth:`save`, :meth:`load`; mergeable methods also implement :meth:`merge`
    and :meth:`unmerge`.

    Every objective (``sft`` included) trains through one run that asks the method for what only
    it knows: :meth:`prepare` (attach, or load to continue), :meth:`training_context`,
    :meth:`optimizer_groups` and :meth:`trainer_callbacks`. Override those; :meth:`train` stays
    for plugins written before them (``sft`` calls an overridden ``train``; see its docstring).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    description: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    """PEFT's ``peft_type`` for methods stored in PEFT's format (lets plain PEFT dirs be loaded)."""
    peft_variant: ClassVar[str | None] = None
    """The ``adapter_config.json`` flag that marks this method's adapters among the others of its
    ``peft_type`` (DoRA: ``use_dora``). Of the methods declaring one format, the first registered
    reads plain PEFT directories of it (built-ins first: ``lora``, not ``qlora``)."""
    default_quantize: ClassVar[str | None] = None
    """``--quantize`` used when the user gives none (QLoRA: "nf4"); None means full precision."""
    virtual_tokens: ClassVar[str | None] = None
    """How the adapter adds virtual tokens, if it does: ``"prefix"`` (keys/values before every layer's
    attention: prefix tuning) or ``"input"`` (embeddings before the prompt: prompt tuning, P-tuning).
    Objectives whose trainer calls the backbone directly, or reads the last input token, refuse them
    before the base loads."""
    reference_copy: ClassVar[bool] = True
    """The model can hold a frozen copy of this method's adapter beside the trained one (TRL's
    preference trainers add one for a PEFT adapter); PEFT's AdaLoRA holds one adapter only."""
    foldable_bottom: ClassVar[bool] = False
    """``train --on`` may train a new adapter on top of this method's: the bottom is merged into the
    run's base weights, which equals the server's composition only when the adapter's change is
    added to a layer's output whatever else is applied (LoRA deltas, biases). A scale of a layer's
    input (IA3) or of its output with the deltas in it (DoRA's magnitude) would rescale the top's
    delta on the server but not in training, so those, and methods that do not say, stay False."""
    recommended_options: ClassVar[dict[str, Any]] = {}
    """Training options (``TrainOptions`` fields, e.g. ``{"lr": 1e-3}``) this method gets unless the
    user sets them: defaults that learn without tuning. Shown by ``adapterhub plugins --method``."""

    #: Set by the plugin manager: "built-in" or the distribution that provided the method.
    origin: str = "built-in"

    # -- config --------------------------------------------------------------------------------

    def make_config(self, values: dict[str, Any] | None = None) -> MethodConfig:
        """Validated config from user values (YAML / ``--set``); unknown keys are errors."""
        return self.config_class.from_dict(values or {})

    # -- training ------------------------------------------------------------------------------

    def attach(self, model: "nn.Module", config: MethodConfig) -> "nn.Module":
        """Add a fresh, trainable adapter to ``model`` and freeze everything else.

        Returns the module to train (the same object or a wrapper such as a ``PeftModel``).
        """
        raise NotImplementedError(f"method {self.name!r} does not implement attach()")

    def prepare(
        self,
        model: "nn.Module",
        config: MethodConfig,
        options: "TrainOptions",
        *,
        train_size: int,
        resume_adapter: str | Path | None = None,
    ) -> "nn.Module":
        """The module to train: ``model`` with a fresh adapter attached, or with ``resume_adapter``
        (``--from``) loaded trainable to continue it. ``train_size`` (examples in the training set)
        is there for methods whose adapter depends on the planned step count (AdaLoRA)."""
        if resume_adapter is not None:
            return self.load(model, resume_adapter, trainable=True)
        return self.attach(model, config)

    def training_context(self, model: "nn.Module") -> ContextManager[Any]:
        """Entered around building and running the trainer, for every objective: what the method
        needs while it trains (the bottleneck adapter marks a quantized base as trainable)."""
        return contextlib.nullcontext()

    def train(
        self,
        model: "nn.Module",
        dataset: Any,
        config: MethodConfig,
        options: "TrainOptions",
        *,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        callbacks: list[Any] | None = None,
        resume_adapter: str | Path | None = None,
    ) -> "TrainResult":
        """Supervised fine-tuning of an adapter for ``model`` on ``dataset``: the trained model and metrics.

        Kept for plugins that override it (written before :meth:`prepare`); built-in methods do not,
        and the ``sft`` objective runs :meth:`prepare` + the shared trainer run directly unless a
        plugin overrides this. ``resume_adapter`` continues an existing adapter of this method.
        """
        from .training import fit  # up a layer, lazily: the one ignored edge in .importlinter

        trainable = self.prepare(model, config, options, train_size=len(dataset), resume_adapter=resume_adapter)
        return fit(
            self,
            trainable,
            config,
            dataset,
            options,
            eval_dataset=eval_dataset,
            tokenizer=tokenizer,
            callbacks=callbacks,
        )

    def optimizer_groups(
        self, model: "nn.Module", config: MethodConfig, options: "TrainOptions"
    ) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or ``None`` for one group with ``options.lr``.

        LoRA+ uses this to give B matrices a larger learning rate.
        """
        return None

    def trainer_callbacks(self, model: "nn.Module", config: MethodConfig, options: "TrainOptions") -> list[Any]:
        """Extra ``TrainerCallback`` objects this method needs (AdaLoRA's rank budget, ...)."""
        return []

    # -- persistence ---------------------------------------------------------------------------

    def save(self, model: "nn.Module", directory: str | Path) -> None:
        """Write the adapter (not the base) to ``directory``: safetensors + a JSON config only."""
        raise NotImplementedError(f"method {self.name!r} does not implement save()")

    def load(self, model: "nn.Module", directory: str | Path, *, trainable: bool = False) -> "nn.Module":
        """Attach the adapter stored in ``directory`` to the base ``model`` and return the result."""
        raise NotImplementedError(f"method {self.name!r} does not implement load()")

    def detach(self, model: "nn.Module") -> "nn.Module":
        """Remove the adapter's modules and return the base model.

        Base weights stay as they are: after :meth:`merge` they hold the merged adapter (that is
        how ``adapterhub merge`` writes a merged model); otherwise they are the plain base.
        """
        raise NotImplementedError(f"method {self.name!r} does not implement detach()")

    # -- merging -------------------------------------------------------------------------------

    def merge(self, model: "nn.Module") -> None:
        """Fold the adapter into the base weights in place.

        Must refuse (``MergeError``) rather than write non-finite weights, and must record what it
        merged so that :meth:`unmerge` restores the base exactly.
        """
        raise NotMergeable(
            f"method {self.name!r} cannot merge its adapter into the base weights; "
            "serve it unmerged instead"
        )

    def unmerge(self, model: "nn.Module") -> None:
        """Undo :meth:`merge`, restoring the base weights."""
        raise NotMergeable(
            f"method {self.name!r} cannot merge or unmerge its adapter; nothing to undo"
        )

    # -- serving -------------------------------------------------------------------------------

    def serving_form(self, files: "AdapterFiles", base_config: Any) -> "ServingForm | None":
        """The adapter in ``files`` as plain tensors the server can apply per row of a mixed batch.

        ``files`` holds the adapter's files as the server read them, once: build the form from those
        bytes (``files.read_json(name)``, ``files.read_tensors()``, ``files.tensor_views()``) while
        the server checks them against the registry's hashes in parallel; the form is used only if
        every check passes. Code that must read the files itself uses ``files.directory``, which
        waits for the checks first, so it never reads an unchecked file. Outside the server,
        ``AdapterFiles.from_directory(directory)`` gives the files of a plain directory.

        Return ``None`` (the default) to be served by the slower one-adapter-at-a-time path; a
        method that declares ``mixed_batch`` must return a form of a kind the server applies.
        """
        return None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _adapt_legacy_serving_hooks(cls)

    def __repr__(self) -> str:
        return f"<Method {self.name} from {self.origin}>"


def _adapt_legacy_serving_hooks(cls: type) -> None:
    """Deprecated (issue 24), to be removed in the next minor release: plugins written against the
    two serving hooks that came before the one :meth:`Method.serving_form`.

    ``serving_form(directory, base_config)`` (first parameter named ``directory``) is called with
    ``files.directory``, which waits for the hash checks; ``serving_form_from_files(files,
    base_config)`` becomes ``serving_form``. Each warns once, when the class is defined.
    """
    import warnings

    own = vars(cls)
    if "serving_form_from_files" in own and "serving_form" not in own:
        warnings.warn(f"{cls.__qualname__}.serving_form_from_files(files, base_config) is deprecated: rename it "
                      "serving_form(files, base_config), the one serving hook", DeprecationWarning, stacklevel=3)
        cls.serving_form = own["serving_form_from_files"]
    elif "serving_form" in own and _parameters(own["serving_form"])[1:2] == ["directory"]:
        warnings.warn(f"{cls.__qualname__}.serving_form(directory, base_config) is deprecated: the hook now takes "
                      "an AdapterFiles (read files.directory where you need the directory)", DeprecationWarning,
                      stacklevel=3)
        by_directory = own["serving_form"]

        def serving_form(self: Method, files: "AdapterFiles", base_config: Any) -> "ServingForm | None":
            return by_directory(self, files.directory, base_config)

        cls.serving_form = serving_form


def _parameters(function: Any) -> list[str]:
    import inspect

    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # not a plain function: not the old hook
        return []
