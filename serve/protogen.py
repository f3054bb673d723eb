"""Regenerate the gRPC Python code under ``serve/_proto`` from ``proto/adapterhub/v1/*.proto``.

Run ``python -m adapterhub.serve.protogen``. The proto directory is mapped to the virtual path
``adapterhub/serve/_proto`` (protoc's ``-IVIRTUAL=DIR``), so the generated imports read
``from adapterhub.serve._proto import inference_pb2`` and work without any patching; the package
in the protos stays ``adapterhub.v1``.
"""

from __future__ import annotations

import argparse
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
    """Run protoc into a scratch tree and copy the generated modules to ``out_dir``."""
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
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: serve/_proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
