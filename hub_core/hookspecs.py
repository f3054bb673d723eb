"""Every hook an adapterhub plugin can implement.

The host always calls hooks with keyword arguments. A plugin implements a hook by defining a
function of the same name decorated with ``@adapterhub.hookimpl``; it may accept any subset of the
arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from .method import Method
    from .objective import Objective
    from .training import TrainOptions

hookspec = pluggy.HookspecMarker("adapterhub")


# -- registration -------------------------------------------------------------------------------


@hookspec
def adapterhub_register_methods(register: Callable[["Method"], None]) -> None:
    """Register fine-tuning methods.

    Called once, when the plugin manager first needs the method table. Call ``register(method)``
    for each :class:`adapterhub.Method` instance the plugin provides; registering a name that is
    already taken is reported as a plugin error and the first registration wins. The return value
    is ignored.
    """


@hookspec
def adapterhub_register_objectives(register: Callable[["Objective"], None]) -> None:
    """Register training objectives (what an adapter learns from: SFT, DPO, a reward, a teacher...).

    Called once, when the plugin manager first needs the objective table. Call
    ``register(objective)`` for each :class:`adapterhub.Objective` instance the plugin provides;
    a name that is already taken is reported as a plugin error and the first registration wins.
    The return value is ignored.
    """


# -- training -----------------------------------------------------------------------------------


@hookspec
def adapterhub_trainer_callbacks(method: "Method", options: "TrainOptions") -> list[Any] | None:
    """Add ``transformers.TrainerCallback`` objects to a training run.

    Called once per ``adapterhub train`` run, after the method and options are known and before
    the Trainer is built. Return a list of callbacks (or ``None`` for none); the lists of all
    plugins are concatenated. Use it for logging, custom stopping rules or schedules.
    """


# -- command line -------------------------------------------------------------------------------


@hookspec
def adapterhub_register_commands(subparsers: Any) -> None:
    """Add commands (or command groups) to the ``adapterhub`` command line.

    Called once per ``adapterhub`` invocation, while the CLI builds its parser, with the top-level
    ``argparse`` subparsers: add a parser with ``subparsers.add_parser(NAME, help=...)`` and give it
    (or each of its own subcommands) ``set_defaults(func=...)``; the CLI calls ``func(args)`` and
    exits with what it returns (an int; None means 0), printing an ``AdapterHubError`` on one line.
    The built-in ``registry``, ``serve`` and ``generate`` commands are added through this hook too.
    Every invocation runs it, so import heavy modules inside ``func``, not at the top of the
    plugin. The return value is ignored.
    """
