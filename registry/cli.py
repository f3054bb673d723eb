"""``adapterhub registry ...``: the registry's CLI verbs.

The main CLI adds them through the ``adapterhub_register_commands`` hook, like any plugin's
commands (this module is a built-in plugin), and then calls ``args.func(args)``, which returns the
exit code. Expected failures raise ``AdapterHubError`` subclasses; the caller prints them on one line.
Every verb takes ``--json`` for machine-readable output, ``--registry DIR|URL`` with
``--registry-option KEY=VALUE`` (object stores), and ``--cache-dir``/``--cache-max-bytes`` (the
read cache that ``export`` and ``materialize`` verify versions into).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from adapterhub import hookimpl
from adapterhub.errors import AdapterHubError, InvalidReference

from . import open_registry, remote
from .filestore import DEFAULT_MAX_FILE_BYTES
from .location import add_registry_arguments, location_from_args
from .names import parse_reference
from .requires import dependents
from .transfer import export_dir, import_dir


@hookimpl
def adapterhub_register_commands(subparsers: Any) -> None:
    add_registry_parser(subparsers)


class DiskError(AdapterHubError):
    """A registry verb met a full or read-only disk: one ``error:`` line and exit 2, not a traceback."""


# Conditions of the disk (full, read-only, not ours), not bugs: other OSErrors keep their traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _disk_errors_on_one_line(verb: str, func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise DiskError(f"registry {verb}: {exc.strerror}{where}; free space or make it writable, or point "
                            f"--registry (and --cache-dir) at a writable directory") from exc
    return run


def add_registry_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``registry`` command and its verbs to an argparse subparsers object."""
    parser = subparsers.add_parser("registry", help="list, tag, verify, export and share published adapters")
    add_registry_arguments(parser, suppress=True)  # SUPPRESS: never clobber a --registry given earlier
    verbs = parser.add_subparsers(dest="registry_verb", metavar="VERB", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str,
             aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help, aliases=list(aliases))
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        add_registry_arguments(p, suppress=True)
        p.set_defaults(func=_disk_errors_on_one_line(name, func))
        return p

    p = verb("list", _list, "list tasks, or the versions of one task", aliases=("ls",))
    p.add_argument("task", nargs="?", help="a task name; omit to list all tasks")

    p = verb("show", _show, "show the manifest of a version")
    p.add_argument("ref", help="task, task@N or task@TAG")

    p = verb("tag", _tag, "point a tag at a version (moves an existing tag)")
    p.add_argument("ref", help="the version to tag: task@N (or task / task@TAG)")
    p.add_argument("tag", help="tag name, e.g. prod")

    p = verb("untag", _untag, "remove a tag")
    p.add_argument("task")
    p.add_argument("tag")

    p = verb("rm", _rm, "remove a version (its blobs are freed by gc)")
    p.add_argument("ref", help="task@N or task@TAG (a bare task name is refused)")
    p.add_argument("--force", action="store_true", help="also remove a tagged version and its tags, or a version "
                   "that published versions were trained on (train --on): they stop loading")

    p = verb("gc", _gc, "remove unreferenced blobs, stale snapshots and dead writers' temp files")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed")
    p.add_argument("--break-lock", action="store_true",
                   help="object stores: remove a gc.lock left by a gc that died (refused while it is fresh)")

    p = verb("verify", _verify, "re-hash stored files and report every problem (exit 1 if any)")
    p.add_argument("ref", nargs="?", help="a task or version; omit for the whole registry")

    p = verb("export", _export, "write a version as a plain PEFT adapter directory")
    p.add_argument("ref")
    p.add_argument("--out", required=True, type=Path, help="output directory (absent or empty)")

    p = verb("materialize", _materialize, "verify a version into the read cache and print its directory")
    p.add_argument("ref")

    p = verb("import", _import, "publish an adapter directory (adapterhub export or plain PEFT) as a new version")
    p.add_argument("directory", type=Path)
    p.add_argument("--task", required=True)
    _import_options(p)

    p = verb("push", _push, "upload a version to a Hugging Face Hub repo")
    p.add_argument("ref")
    p.add_argument("--repo", required=True, help="Hub repo id, e.g. user/sentiment-lora")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded")

    p = verb("pull", _pull, "download a Hub adapter repo (or a local dir) and import it as a new version")
    p.add_argument("repo_id", help="Hub repo id, or a local directory")
    p.add_argument("--task", required=True)
    p.add_argument("--revision")
    _import_options(p)
    return parser


def _import_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model directory the adapter was trained on (needed without adapterhub.json)")
    p.add_argument("--base-fingerprint", help="the base fingerprint (sha256:...) instead of --base")
    p.add_argument("--method", help="method name, overriding what adapter_config.json says")
    p.add_argument("--parent", help="reference of the version this one derives from")
    p.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES, help="refuse larger files")


def _store(args: argparse.Namespace, **options: Any):
    return open_registry(location_from_args(args), **options)


def _emit(args: argparse.Namespace, data: Any, lines: list[str] | str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(lines if isinstance(lines, str) else "\n".join(lines))


# -- verbs -------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.task is None:
        rows = []
        for task in store.list_tasks():
            versions = store.list_versions(task)
            rows.append({"task": task, "versions": len(versions), "latest": versions[-1], "tags": store.tags(task)})
        lines = [f"{r['task']:<30} {r['versions']:>4} versions  latest @{r['latest']}{_tags_text(r['tags'])}" for r in rows]
        _emit(args, rows, lines or "no tasks in " + store.location)
        return 0
    task = parse_reference(args.task).task
    versions = store.list_versions(task)
    if not versions:
        store.resolve(task)  # raises NotFound with a hint
    tags = store.tags(task)
    rows = []
    for version in versions:
        m = store.get_manifest(task, version)
        on = sorted(t for t, v in tags.items() if v == version) + (["latest"] if version == versions[-1] else [])
        rows.append({"ref": m.ref, "version": version, "method": m.method, "created": m.created, "tags": on,
                     "base": m.base_name, "size": m.total_size, "metrics": m.metrics,
                     "requires": [r.ref for r in m.requires]})
    lines = [f"{r['ref']:<30} {r['method']:<10} {r['created']}  {r['size']:>10} B  {' '.join(r['tags'])}"
             + (f"  on {'+'.join(r['requires'])}" if r["requires"] else "") for r in rows]
    _emit(args, rows, lines)
    return 0


def _tags_text(tags: dict[str, int]) -> str:
    return ("  tags: " + ", ".join(f"{t}=@{v}" for t, v in sorted(tags.items()))) if tags else ""


def _show(args: argparse.Namespace) -> int:
    manifest = _store(args).manifest(args.ref)
    _emit(args, manifest.to_dict(), manifest.to_json().rstrip())
    return 0


def _tag(args: argparse.Namespace) -> int:
    manifest = _store(args).set_tag(args.ref, args.tag)
    _emit(args, {"tag": f"{manifest.task}@{args.tag}", "ref": manifest.ref}, f"{manifest.task}@{args.tag} -> {manifest.ref}")
    return 0


def _untag(args: argparse.Namespace) -> int:
    version = _store(args).remove_tag(parse_reference(args.task).task, args.tag)
    _emit(args, {"removed": f"{args.task}@{args.tag}", "was": version}, f"removed tag {args.task}@{args.tag} (was @{version})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    if not parse_reference(args.ref).explicit:
        raise InvalidReference(f"rm needs an explicit version, e.g. {args.ref}@1; a bare task name is refused")
    store = _store(args)
    stranded = dependents(store, args.ref)  # checked here, not under the store's lock: see README, "Shared bottoms"
    if stranded and not args.force:
        raise AdapterHubError(f"{store.manifest(args.ref).ref} is required by {', '.join(stranded)} (trained on top of "
                              f"it); remove those first, or pass --force to remove it anyway (they stop loading)")
    manifest = store.remove_version(args.ref, force=args.force)
    if stranded:
        print(f"warning: {', '.join(stranded)} required {manifest.ref} and will not load any more", file=sys.stderr)
    _emit(args, {"removed": manifest.ref}, f"removed {manifest.ref} (run `adapterhub registry gc` to free its blobs)")
    return 0


def _gc(args: argparse.Namespace) -> int:
    report = _store(args).gc(dry_run=args.dry_run, break_lock=args.break_lock)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, report, f"{verb} {len(report['blobs_removed'])} blobs ({report['bytes_freed']} bytes), "
          f"{len(report['snapshots_removed'])} snapshots, {len(report['temp_removed'])} temp files")
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems = _store(args).verify(args.ref)
    _emit(args, {"ok": not problems, "problems": [{"path": p.path, "message": p.message} for p in problems]},
          [f"problem: {p}" for p in problems] or "ok: every stored file matches its hash")
    return 1 if problems else 0


def _materialize(args: argparse.Namespace) -> int:
    store = _store(args)
    manifest = store.manifest(args.ref)
    directory = store.materialize(manifest)
    _emit(args, {"ref": manifest.ref, "directory": str(directory)}, str(directory))
    return 0


def _export(args: argparse.Namespace) -> int:
    store = _store(args)
    manifest = store.manifest(args.ref)
    out = export_dir(store, manifest, args.out)
    _emit(args, {"ref": manifest.ref, "out": str(out)}, f"exported {manifest.ref} to {out}")
    return 0


def _import_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"base": args.base, "base_fingerprint": args.base_fingerprint, "method": args.method, "parent": args.parent}


def _import(args: argparse.Namespace) -> int:
    manifest = import_dir(_store(args, max_file_bytes=args.max_file_bytes), args.task, args.directory, **_import_kwargs(args))
    _emit(args, manifest.to_dict(), manifest.ref)
    return 0


def _push(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.dry_run:
        manifest = store.manifest(args.ref)
        with tempfile.TemporaryDirectory(prefix="adapterhub-push-") as tmp:
            files = remote.stage_push(store, manifest, Path(tmp) / "export")
        _emit(args, {"ref": manifest.ref, "repo": args.repo, "files": files},
              [f"would upload {manifest.ref} to {args.repo}:"] + [f"  {f}" for f in files])
        return 0
    result = remote.push(store, args.ref, args.repo, private=args.private, revision=args.revision)
    _emit(args, result, f"pushed {result['ref']} to {args.repo} ({len(result['files'])} files)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    store = _store(args, max_file_bytes=args.max_file_bytes)
    manifest = remote.pull(store, args.repo_id, args.task, revision=args.revision, **_import_kwargs(args))
    _emit(args, manifest.to_dict(), manifest.ref)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m adapterhub.registry``): the verbs without the main CLI."""

    parser = argparse.ArgumentParser(prog="python -m adapterhub.registry")
    sub = parser.add_subparsers(dest="command", required=True)
    add_registry_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["registry"]:
        argv.insert(0, "registry")  # `python -m adapterhub.registry list` == `... registry list`
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AdapterHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
