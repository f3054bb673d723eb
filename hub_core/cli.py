"""The ``adapterhub`` command line.

Each subcommand is a small function taking parsed args and returning an exit code. Expected
errors (:class:`AdapterHubError`) print one line on stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

from adapterhub.registry.location import add_registry_arguments, location_from_args
from adapterhub.registry.names import validate_task

from . import huge_pages
from .adapters import parse_set_values
from .base import DTYPE_CHOICES, QUANTIZE_CHOICES, fingerprint, init_base
from .errors import AdapterHubError, ConfigError
from .manager import get_manager
from .pipeline import merge_to_directory, train_and_publish
from .presets import DEFAULT_PRESET, PRESETS, SAVE_DTYPES
from .threads import add_threads_argument, use_threads
from .training import METHOD_RECOMMENDED, TrainOptions

log = logging.getLogger("adapterhub")


# -- base ----------------------------------------------------------------------------------------


def cmd_base_init(args: argparse.Namespace) -> int:
    out = init_base(args.preset, args.out, seed=args.seed, dtype=args.dtype)
    print(out)
    return 0


def cmd_base_fingerprint(args: argparse.Namespace) -> int:
    print(fingerprint(args.base))
    return 0


# -- plugins -------------------------------------------------------------------------------------


def plugin_rows() -> list[dict[str, Any]]:
    manager = get_manager()
    rows = []
    for method in manager.methods().values():
        rows.append(
            {
                "name": method.name,
                "origin": method.origin,
                "description": method.description,
                "capabilities": method.capabilities.as_dict(),
                "serving": "mixed batch" if method.capabilities.mixed_batch else
                ("exclusive: the running batch pauses while it generates alone"),
                "config": method.config_class.describe(),
                "recommended_options": dict(method.recommended_options),
                "status": "ok",
            }
        )
    for broken in manager.broken:
        rows.append({"name": broken.name, "origin": broken.origin, "status": "broken", "error": broken.error})
    return rows


def recommended_text(recommended: dict[str, Any]) -> str:
    """``  --lr 0.001 (adapterhub's default: 0.0002)`` lines for a method's recommended options."""

    defaults = TrainOptions()
    lines = [f"  --{k.replace('_', '-')} {v} (general default {getattr(defaults, k)})" for k, v in recommended.items()]
    return "\n".join(lines) or "  (the general defaults: see `adapterhub train --help`)"


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = plugin_rows()
    if args.method:
        rows = [r for r in rows if r["name"] == args.method]
        if not rows:
            get_manager().get_method(args.method)  # raises the helpful error
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    flags = ("mergeable", "quantized_base", "mixed_batch", "composable")
    header = f"{'method':<12} {'origin':<28} " + " ".join(f"{f:<14}" for f in flags)
    print(header)
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['name']:<12} {row['origin']:<28} BROKEN: {row['error']}")
            continue
        caps = row["capabilities"]
        print(f"{row['name']:<12} {row['origin']:<28} " + " ".join(f"{'yes' if caps[f] else 'no':<14}" for f in flags))
        if not caps["mixed_batch"]:
            print(f"{'':<12} note: served on the exclusive path: the running batch pauses while it generates alone")
        if args.method:
            print(f"\n{row['description']}\n\nconfig keys (--set KEY=VALUE):")
            for f in row["config"]:
                print(f"  {f['name']} ({f['type']}, default {f['default']!r}): {f['help']}")
            print("\ntraining defaults for this method (flags override them):")
            print(recommended_text(row["recommended_options"]))
    return 0


def objective_rows() -> list[dict[str, Any]]:
    return [
        {
            "name": o.name,
            "origin": o.origin,
            "description": o.description,
            "data_shape": o.data_shape,
            "experimental": o.experimental,
            "head": o.head,
            "config": o.config_class.describe(),
            "recommended_options": dict(o.recommended_options),
            "lr_scale": o.lr_scale,
        }
        for o in get_manager().objectives().values()
    ]


def cmd_objectives(args: argparse.Namespace) -> int:
    rows = objective_rows()
    if args.objective:
        rows = [r for r in rows if r["name"] == args.objective]
        if not rows:
            get_manager().get_objective(args.objective)  # raises the helpful error
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        label = " [experimental]" if row["experimental"] else ""
        print(f"{row['name']}{label} ({row['origin']}): {row['description']}")
        print(f"  data: {row['data_shape']}")
        keys = ", ".join(f"{f['name']}={f['default']!r}" for f in row["config"]) or "(none)"
        print(f"  config (--objective-set KEY=VALUE): {keys}")
        if args.objective:
            for f in row["config"]:
                choices = f" (one of {', '.join(map(str, f['choices']))})" if f["choices"] else ""
                print(f"    {f['name']} ({f['type']}, default {f['default']!r}): {f['help']}{choices}")
            print(objective_recommended_text(row["recommended_options"], row["lr_scale"]))
    return 0


def objective_recommended_text(recommended: dict[str, Any], lr_scale: float | None = None) -> str:
    """What ``adapterhub objectives --objective NAME`` says about the training options it brings."""

    if not recommended and lr_scale is None:
        return "  training options: the method's recommended ones (this objective brings none of its own)"
    lines = [f"    --{key.replace('_', '-')} {value}" for key, value in recommended.items()]
    if lr_scale is not None and "lr" not in recommended:
        lines.append(f"    --lr: the method's recommended lr x {lr_scale:g}")
    return "\n".join(["  training options (over the method's recommended ones; flags override them):", *lines])


# -- train ---------------------------------------------------------------------------------------


def _train_option_fields():
    hints = typing.get_type_hints(TrainOptions)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainOptions)]


def _default_text(field: dataclasses.Field) -> str:
    if field.name in METHOD_RECOMMENDED:
        return (f"default: the method's recommended value, shown by `adapterhub plugins --method NAME`; "
                f"{field.default} for a method that recommends none")
    return f"default {field.default}"


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train an adapter with a method plugin", description="Train an adapter.")
    p.add_argument("--plugin", help="method plugin name (see `adapterhub plugins`)")
    p.add_argument("--objective", help="what it learns from: sft (default), dpo, kto, reward, grpo, distill, ... "
                                       "(see `adapterhub objectives`)")
    p.add_argument("--objective-set", action="append", default=[], metavar="KEY=VALUE",
                   help="objective config value, e.g. beta=0.1 (repeatable)")
    p.add_argument("--base", help="base model: local HF directory or Hub id")
    p.add_argument("--data", action="append", metavar="FILE[:weight=W,name=N]",
                   help="training data, JSON Lines in the objective's shape (sft: instruction or chat); repeat it to "
                        "train on several tasks at once, each FILE a task named by its stem (or name=N) and drawn "
                        "with weight W (default: the files concatenated)")
    p.add_argument("--data-weights", metavar="W1,W2,...",
                   help="one sampling weight per --data file, in order (relative rates >= 0, like LLaMA-Factory's "
                        "interleave_probs)")
    p.add_argument("--data-temperature", metavar="T",
                   help="weights from the file sizes, T5-style: p_i ~ n_i ** (1/T) (1: proportional, larger: "
                        "closer to uniform)")
    p.add_argument("--task", help="task name; the adapter is published as TASK@N")
    p.add_argument("--output", help="also write a plain PEFT-format copy of the adapter here")
    p.add_argument("--config", help="YAML file with any of these options (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config value (repeatable)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="load the base quantized")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="compute dtype of the base (auto: the checkpoint's own on a GPU, float32 on the CPU); "
                        "trainable weights stay float32")
    add_registry_arguments(p)  # --registry DIR|URL, --registry-option KEY=VALUE, --cache-dir, --cache-max-bytes
    p.add_argument("--no-publish", action="store_true", default=None, help="do not publish to the registry")
    p.add_argument("--from", dest="from_adapter", help="continue training this adapter (REF or DIR)")
    p.add_argument("--on", dest="on_adapter", metavar="REF",
                   help="train a new adapter on top of this published one (task@N or task@TAG, pinned now), frozen "
                        "below it in training and served below it (YAML key 'on_adapter:')")
    for field, tp in _train_option_fields():
        flag = "--" + field.name.replace("_", "-")
        helptext = field.metadata.get("help", "")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, dest=field.name, default=None, help=f"{helptext} ({_default_text(field)})")
    p.set_defaults(func=cmd_train)


TOP_LEVEL_KEYS = {"plugin", "objective", "base", "data", "task", "output", "quantize", "dtype", "registry", "no_publish",
                  "from_adapter", "on_adapter"}

TOP_LEVEL_KEYS |= {"data_weights", "data_temperature"}  # multi-task --data (adapterhub.mixture)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value at the top level")
    return data


def resolve_train_settings(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(top-level settings, method config values, training options, objective config values) from
    YAML + flags."""

    yaml_values = _load_yaml(args.config) if args.config else {}
    method_values = dict(yaml_values.pop("method_config", None) or {})
    objective_values = dict(yaml_values.pop("objective_config", None) or {})
    if "from" in yaml_values:
        yaml_values["from_adapter"] = yaml_values.pop("from")
    if True in yaml_values:  # YAML 1.1 reads a bare `on:` key as the boolean true
        raise ConfigError(f"--config {args.config}: YAML reads the key 'on:' (or yes/true) as a boolean; write "
                          "'on_adapter: REF' for --on")
    option_names = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = set(yaml_values) - option_names - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"--config {args.config}: unknown key(s) {', '.join(sorted(unknown))}; method settings go under "
            "'method_config:', objective settings under 'objective_config:', training options are: "
            + ", ".join(sorted(option_names))
        )
    top = {k: yaml_values[k] for k in TOP_LEVEL_KEYS if k in yaml_values}
    options = {k: yaml_values[k] for k in option_names if k in yaml_values}
    for key in TOP_LEVEL_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            top[key] = value
    for key in option_names:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    method_values.update(parse_set_values(args.set))
    objective_values.update(parse_set_values(args.objective_set, flag="--objective-set"))
    for key in ("plugin", "base", "data", "task"):
        if not top.get(key) and not (key == "task" and top.get("no_publish")):
            raise ConfigError(f"train needs --{key} (or '{key}:' in --config)")
    return top, method_values, options, objective_values


def cmd_train(args: argparse.Namespace) -> int:
    top, method_values, option_values, objective_values = resolve_train_settings(args)
    top["registry"] = location_from_args(args, top.get("registry"))  # a URL from --config takes the options too
    manager = get_manager()
    method = manager.get_method(top["plugin"])
    objective = manager.get_objective(top.get("objective") or "sft")
    config = method.make_config(method_values)  # config errors before anything loads
    objective_config = objective.make_config(objective_values)
    options = TrainOptions.for_method(method, option_values, objective)
    if top.get("task"):
        validate_task(top["task"])

    result = train_and_publish(method, config, options, top, objective, objective_config)
    if result.reference or result.directory:  # under torchrun only rank 0 wrote (and prints) it
        print(result.reference or result.directory)
    return 0


# -- merge ---------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    use_threads(args.threads)  # before the base loads
    out = merge_to_directory(args.adapter, args.base, args.out, registry=location_from_args(args),
                             allow_base_mismatch=args.allow_base_mismatch, dtype=args.dtype)
    print(out)
    return 0


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterhub", description="Train, version and serve fine-tuning adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    base = sub.add_parser("base", help="base models: write a preset, fingerprint").add_subparsers(
        dest="base_command", metavar="VERB")
    init = base.add_parser("init", help="write a preset base as a Hugging Face model directory",
                           description="Write a preset base as a Hugging Face model directory. Presets: " + "; ".join(
                               f"{name}: {spec.description}" for name, spec in PRESETS.items()))
    init.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                      help=f"which base (default {DEFAULT_PRESET}; tiny and small are random, for tests)")
    init.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    init.add_argument("--dtype", choices=SAVE_DTYPES, help="dtype of the saved weights (default: the preset's own)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed of the random presets")
    init.set_defaults(func=cmd_base_init)
    fp = base.add_parser("fingerprint", help="print a base model's fingerprint")
    fp.add_argument("base")
    fp.set_defaults(func=cmd_base_fingerprint)

    plugins = sub.add_parser("plugins", help="list method plugins and their capabilities")
    plugins.add_argument("--json", action="store_true")
    plugins.add_argument("--method", help="show one method with its config keys")
    plugins.set_defaults(func=cmd_plugins)

    objectives = sub.add_parser("objectives", help="list training objectives (what an adapter learns from)")
    objectives.add_argument("--json", action="store_true")
    objectives.add_argument("--objective", help="show one objective with its config keys")
    objectives.set_defaults(func=cmd_objectives)

    add_train_parser(sub)

    merge = sub.add_parser("merge", help="write a full-precision base with an adapter merged in")
    merge.add_argument("adapter", help="registry reference (task@N) or adapter directory")
    merge.add_argument("--base", required=True)
    merge.add_argument("--out", required=True)
    add_registry_arguments(merge)
    merge.add_argument("--allow-base-mismatch", action="store_true")
    merge.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="dtype of the written model (auto: the base checkpoint's own); the merge itself runs in float32")
    add_threads_argument(merge)
    merge.set_defaults(func=cmd_merge)


    get_manager().register_commands(sub)  # registry, serve, generate and plugins' commands: one hook
    return parser


def main(argv: list[str] | None = None) -> int:
    huge_pages.enable()  # before a plugin or command imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AdapterHubError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
