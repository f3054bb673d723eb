"""``adapterhub score``: rewards from a reward adapter for answers in a JSON Lines file.

A file holds one kind of line: answers to score (``{PROMPT, "response"}``, one reward a line) or
preference pairs (``{PROMPT, "chosen", "rejected"}``, both rewards a line, then the ranking accuracy:
the share of pairs whose chosen answer scores higher). PROMPT is any of the prompt keys training
data uses. Registered through ``adapterhub_register_commands`` like every built-in command; torch
loads only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapterhub import hookimpl
from adapterhub.base import QUANTIZE_CHOICES
from adapterhub.data import iter_jsonl
from adapterhub.errors import ConfigError, DataError
from adapterhub.objectives.scoring import RewardModel
from adapterhub.objectives.shapes import answer_turns, prompt_turns
from adapterhub.registry.location import add_registry_arguments, location_from_args
from adapterhub.threads import add_threads_argument, use_threads

ANSWER_KEYS = ("response", "completion")


@hookimpl
def adapterhub_register_commands(subparsers: Any) -> None:
    add_score_parser(subparsers)


def add_score_parser(subparsers: Any) -> argparse.ArgumentParser:
    help = "score answers (or rank preference pairs) with a reward adapter"
    p = subparsers.add_parser("score", help=help, description=help + "; pairs also print the ranking accuracy "
                              "(share of pairs whose chosen answer scores above the rejected one)")
    p.add_argument("adapter", metavar="REWARD_REF", help="a reward adapter: task@N, task@tag or an adapter directory")
    p.add_argument("--data", required=True,
                   help='JSONL: {"prompt"|"messages"|"instruction", "response"} or {..., "chosen", "rejected"} lines')
    p.add_argument("--base", help="base model directory (default: the one recorded with the adapter)")
    add_registry_arguments(p)
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    p.add_argument("--device", default=None, help="auto (default: the first GPU, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    add_threads_argument(p)
    p.set_defaults(func=score_command)
    return p


def read_score_lines(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """("answers" | "pairs", rows); every line validated, ``file:line: reason`` for a bad one."""

    kind, first, rows = "", "", []
    for where, example in iter_jsonl(path):
        prompt = prompt_turns(example, where)
        if "chosen" in example or "rejected" in example:
            line_kind = "pairs"
            answers = {k: answer_turns(example, k, where)[0]["content"] for k in ("chosen", "rejected")}
        else:
            given = [k for k in ANSWER_KEYS if k in example]
            if len(given) != 1:
                raise DataError(f"{where}: give the answer to score as one of {' | '.join(map(repr, ANSWER_KEYS))}, "
                                "or a pair as 'chosen' and 'rejected'")
            line_kind = "answers"
            answers = {"response": answer_turns(example, given[0], where)[0]["content"]}
        if kind and line_kind != kind:
            raise DataError(f"{where}: this line holds {line_kind}, but {first} holds {kind}; score one kind a file")
        kind, first = line_kind, first or where
        rows.append({"line": int(where.rsplit(":", 1)[1]), "prompt": prompt, **answers})
    return kind, rows


def score_command(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    kind, rows = read_score_lines(args.data)  # before the base loads
    use_threads(args.threads)
    model = RewardModel.load(args.adapter, registry=location_from_args(args), base=args.base,
                             quantize=args.quantize, device=args.device)
    prompts = [r["prompt"] for r in rows]
    if kind == "answers":
        for row, reward in zip(rows, model.score(prompts, [r["response"] for r in rows], batch_size=args.batch_size)):
            print(json.dumps({"line": row["line"], "reward": reward}) if args.json else f"{reward:.6f}")
        return 0
    both = model.score(prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                       batch_size=args.batch_size)
    chosen, rejected = both[:len(rows)], both[len(rows):]
    for row, c, r in zip(rows, chosen, rejected):
        print(json.dumps({"line": row["line"], "chosen": c, "rejected": r}) if args.json
              else f"line {row['line']}: chosen {c:.6f} rejected {r:.6f}")
    correct = sum(c > r for c, r in zip(chosen, rejected))
    summary = {"accuracy": correct / len(rows), "correct": correct, "pairs": len(rows), "adapter": model.reference}
    print(json.dumps(summary) if args.json else
          f"ranking accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)} pairs, chosen above rejected)")
    return 0
