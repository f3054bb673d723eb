"""adapterhub: train, version and serve fine-tuning adapters of language models.

Plugin authors need only this module::

    import adapterhub

    class MyMethod(adapterhub.Method): ...

    @adapterhub.hookimpl
    def adapterhub_register_methods(register):
        register(MyMethod())
"""

from __future__ import annotations

import pluggy

from .adapter_files import AdapterFiles
from .config import MethodConfig, option
from .errors import (
    AdapterHubError,
    BaseMismatch,
    ConfigError,
    DataError,
    IntegrityError,
    MergeError,
    NotFound,
    NotMergeable,
    PluginError,
)
from .method import Capabilities, Method
from .objective import Objective, ObjectiveConfig, TrainingJob

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("adapterhub")

__all__ = [
    "AdapterFiles",
    "AdapterHubError",
    "BaseMismatch",
    "Capabilities",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "MergeError",
    "Method",
    "MethodConfig",
    "NotFound",
    "NotMergeable",
    "Objective",
    "ObjectiveConfig",
    "PluginError",
    "TrainingJob",
    "__version__",
    "hookimpl",
    "option",
]
