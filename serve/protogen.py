"""Regenerate the gRPC Python code under ``serve/_proto`` from ``proto/adapterhub/v1/*.proto``.

Run ``python -m adapterhub.serve.protogen``. The proto directory is mapped to the virtual path
``adapterhub/serve/_proto`` (protoc's ``-IVIRTUAL=DIR``), so the generated imports read
``from adapterhub.serve._proto import inference_pb2`` and work without any patching; the package
in the protos stays ``adapterhub.v1``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "adapterhub" / "v1"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
VIRTUAL = "adapterhub/serve/_proto"
PROTOS = ("inference.proto", "admin.proto")


def generate(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc into a scratch tree and copy the generated modules to ``out_dir``, with the
    ``.proto`` sources beside them: the wheel carries them there (package data), for clients in
    other languages and for gRPC reflection users who want the files."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL}={proto_dir}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL}/{name}" for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((Path(tmp) / VIRTUAL).iterdir()):
            shutil.copyfile(path, out_dir / path.name)
            written.append(out_dir / path.name)
        for name in PROTOS:
            shutil.copyfile(proto_dir / name, out_dir / name)
            written.append(out_dir / name)
    return written


# What a newer generator changes without changing the code's meaning: the version it stamps in
_VERSION_STAMPS = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '*'"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: *"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
     r"\1 *,"),
)


def comparable(text: str) -> str:
    """Generated code with the generator's version stamps blanked, for the staleness test: the
    messages and services must match the ``.proto`` files, the generator's patch level need not."""
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: serve/_proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
