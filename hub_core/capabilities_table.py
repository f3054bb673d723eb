"""The README's method tables (capabilities, config keys, recommended training options) and
the objectives table (their recommended training options), generated from the registered plugins (never
written by hand), and the built-in PEFT formats table of
:mod:`adapterhub.metadata` (the registry's torch-free copy of what the plugins declare).

``python -m adapterhub.capabilities_table --write README.md`` rewrites the tables between the
markers; a test fails when a copy is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from adapterhub import metadata
from adapterhub.base import init_base, load_base
from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions

BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
KEYS_BEGIN, KEYS_END = "<!-- method-configs:begin -->", "<!-- method-configs:end -->"
DEFAULTS_BEGIN, DEFAULTS_END = "<!-- method-defaults:begin -->", "<!-- method-defaults:end -->"
OBJECTIVES_BEGIN, OBJECTIVES_END = "<!-- objective-defaults:begin -->", "<!-- objective-defaults:end -->"
PEFT_BEGIN, PEFT_END = "    # peft-formats:begin", "    # peft-formats:end"


def trainable_share(method, base_dir) -> float:
    """Trainable parameters of a freshly attached adapter over the base's parameter count."""

    total = sum(p.numel() for p in load_base(base_dir, "none").model.parameters())  # 4-bit packing halves numel
    base = load_base(base_dir, getattr(method, "default_quantize", None) or "none")
    model = method.attach(base.model, method.make_config({}))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / total


def render(base_dir) -> str:
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = [
        "| method | origin | mergeable | quantized base | mixed-batch servable | composable | trainable share (tiny base) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, method in sorted(PluginManager(autoload=False).methods().items()):
        caps = method.capabilities
        share = trainable_share(method, base_dir)
        lines.append(
            f"| `{name}` | {method.origin} | {yes(caps.mergeable)} | {yes(caps.quantized_base)} | "
            f"{yes(caps.mixed_batch)} | {yes(caps.composable)} | {share:.2%} |"
        )
    return "\n".join(lines)


def render_config_keys() -> str:
    """One paragraph per method: what it is and every config key with its type, default and help."""

    parts = []
    for name, method in sorted(PluginManager(autoload=False).methods().items()):
        keys = "; ".join(
            f"`{row['name']}` ({row['type']}, default `{row['default']!r}`): {row['help']}"
            + (f" (one of {', '.join(map(str, row['choices']))})" if row["choices"] else "")
            for row in method.config_class.describe()
        )
        parts.append(f"- **`{name}`**: {method.description} Keys: {keys or '(none)'}.")
    return "\n".join(parts)


def render_defaults() -> str:
    """The training options each method gets unless the user sets them (``recommended_options``)."""

    general = TrainOptions()
    lines = ["| method | recommended training options (flags override them) |", "| --- | --- |"]
    for name, method in sorted(PluginManager(autoload=False).methods().items()):
        options = TrainOptions.for_method(method, {})  # also checks that every key and value is valid
        shown = ", ".join(f"`--{key.replace('_', '-')} {getattr(options, key)}`" for key in method.recommended_options)
        lines.append(f"| `{name}` | {shown or '(the general defaults)'} |")
    lines.append(f"| (general) | `--lr {general.lr}`, `--epochs {general.epochs}`, `--batch-size {general.batch_size}` |")
    return "\n".join(lines)


def render_objective_defaults() -> str:
    """The training options each objective brings over the method's (``Objective.recommended_options``)."""

    lines = ["| objective | recommended training options (over the method's; flags override them) |", "| --- | --- |"]
    own = "(the method's own)"
    for name, objective in sorted(PluginManager(autoload=False).objectives().items()):
        options = TrainOptions.from_dict(dict(objective.recommended_options))  # also checks keys and values
        shown = [f"`--{key.replace('_', '-')} {getattr(options, key)}`" for key in objective.recommended_options]
        if objective.lr_scale is not None and "lr" not in objective.recommended_options:
            shown.append(f"`--lr`: the method's x {objective.lr_scale:g}")
        shown = ", ".join(shown)
        lines.append(f"| `{name}` | {shown or own} |")
    return "\n".join(lines)


def render_peft_formats() -> str:
    """The body of ``adapterhub.metadata.BUILTIN_PEFT_FORMATS``, from the built-ins' declarations."""

    formats = PluginManager(autoload=False).peft_formats()
    text = lambda value: "None" if value is None else f'"{value}"'  # noqa: E731
    return "\n".join(f"    ({text(peft_type)}, {text(variant)}): {text(formats[peft_type, variant])},"
                     for peft_type, variant in sorted(formats, key=lambda key: (key[0], key[1] or "")))


def replace_between(readme: str, begin: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {begin} ... {end} markers")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", readme)


def replace_table(readme: str, table: str) -> str:
    return replace_between(readme, BEGIN, END, table)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", help="README to update in place (default: print the table)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        table = render(init_base("tiny", Path(tmp) / "tiny"))
    if args.write:
        path = Path(args.write)
        text = replace_table(path.read_text(), table)
        text = replace_between(text, KEYS_BEGIN, KEYS_END, render_config_keys())
        text = replace_between(text, DEFAULTS_BEGIN, DEFAULTS_END, render_defaults())
        path.write_text(replace_between(text, OBJECTIVES_BEGIN, OBJECTIVES_END, render_objective_defaults()))

        source = Path(metadata.__file__)
        source.write_text(replace_between(source.read_text(), PEFT_BEGIN, PEFT_END, render_peft_formats()))
    else:
        sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
