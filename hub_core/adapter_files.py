"""An adapter's files read once into memory: the input of :meth:`Method.serving_form_from_files`.

The server reads each file of a registry version exactly once and checks those same bytes against
the version's sha256 in a background thread while the method builds its serving form from them;
the form is used only after every check passed. So a method that builds its form from these bytes
never reads the disk a second time, and nothing separates the bytes checked from the bytes used.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import IntegrityError, NotFound

WEIGHTS_FILE = "adapter_model.safetensors"

if TYPE_CHECKING:
    import torch

# safetensors dtype names (https://github.com/huggingface/safetensors, format section) -> torch's
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class AdapterFiles:
    """An adapter version's files as bytes, by file name (``adapter_config.json``, ...).

    Read them with :meth:`read_bytes`, :meth:`read_json` and :meth:`read_tensors`; allocate the
    form's tensors with :meth:`empty`. ``directory`` is where the files lie on disk, for code that
    must read them itself: on the server, asking for it waits until every file passed its hash
    check, so such code never reads an unchecked file (what :meth:`Method.serving_form` always got).
    """

    def __init__(self, data: Mapping[str, memoryview], directory: str | Path, *, check: Callable[[], None] = lambda: None,
                 workspace: Callable[[int], memoryview] | None = None):
        self._data = dict(data)
        self._directory = Path(directory)
        self._check = check
        self._workspace = workspace
        self._space: memoryview | None = None  # from the workspace, for empty(); bytes used so far:
        self._used = 0
        self._checked = False
        self._from_disk = False

    @classmethod
    def from_directory(cls, directory: str | Path) -> "AdapterFiles":
        """A plain adapter directory's files, each read when first asked for (nothing to check them against)."""
        files = cls({}, directory)
        files._from_disk = True
        return files

    @property
    def directory(self) -> Path:
        self.check()
        return self._directory

    def check(self) -> None:
        """Wait for the hash checks; IntegrityError naming the file when one did not match."""
        if not self._checked:
            self._check()
            self._checked = True

    def names(self) -> list[str]:
        if self._from_disk:
            return sorted(p.name for p in self._directory.iterdir() if p.is_file())
        return sorted(self._data)

    def read_bytes(self, name: str) -> memoryview:
        """A file's bytes (``bytes(...)`` of it for a copy); NotFound naming the files there are."""
        if name not in self._data and self._from_disk and (self._directory / name).is_file():
            self._data[name] = read_file(self._directory / name)
        try:
            return self._data[name]
        except KeyError:
            raise NotFound(f"adapter {self._directory} has no file {name!r} (files: {', '.join(self.names())})") from None

    def read_json(self, name: str) -> Any:
        return json.loads(bytes(self.read_bytes(name)))

    def read_tensors(self, name: str = WEIGHTS_FILE) -> dict[str, "torch.Tensor"]:
        """The tensors of a safetensors file, as views of its bytes (no copy).

        Treat them as read-only: on the server their bytes are being hashed while you read them.
        Copy what you keep (``.clone()``, or any arithmetic): a view keeps the whole file in memory.
        """
        return parse_safetensors(self.read_bytes(name), f"{self._directory / name}")

    def empty(self, *shape: int, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """Uninitialised memory for a form's tensor (use it like ``torch.empty``).

        On the server it comes from one buffer that the next load reuses once this form is no
        longer used (the engine copies a form into its stacks on first use): no fresh pages to
        fault in for every load, and no freed copy left in each server thread's malloc arena.
        """
        import torch

        dtype = dtype or torch.float32
        nbytes = math.prod(shape) * dtype.itemsize
        if self._space is None and self._workspace is not None:
            self._space = self._workspace(sum(len(data) for data in self._data.values()))  # ~ a form's size
        start = -(-self._used // 64) * 64  # each tensor 64-byte aligned
        if self._space is None or nbytes == 0 or start + nbytes > len(self._space):
            return torch.empty(shape, dtype=dtype)
        self._used = start + nbytes
        return torch.frombuffer(self._space, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).view(shape)


class ReusableBuffer:
    """One buffer handed out again and again, each time nothing views it any more.

    For big temporaries of each adapter load (a file's bytes, a form's tensors). Fresh memory for
    every load costs page faults (~0.4 ms per MB on this project's VMs); freed memory stays cached
    in the malloc arena of the thread that allocated it, one copy per server thread. While a view
    is still held (say, by a form not used yet) the next caller gets a new buffer, which becomes
    the one reused.
    """

    def __init__(self) -> None:
        self._buffer: Any = None
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        import numpy

        with self._lock:
            buffer = self._buffer
            if buffer is None or buffer.nbytes < nbytes or sys.getrefcount(buffer) > 3:  # self._buffer, buffer, the call
                buffer = self._buffer = numpy.empty(nbytes, dtype=numpy.uint8)  # not zeroed: one pass less
            return memoryview(buffer)[:nbytes]


def read_file(path: Path) -> memoryview:
    """A file's bytes in a writable buffer, so tensors can view them (no copy, no warning)."""
    with open(path, "rb", buffering=0) as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    return memoryview(data)


def parse_safetensors(data: memoryview, where: str) -> dict[str, "torch.Tensor"]:
    """Tensors of a safetensors file held in ``data``, as views of it.

    The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets}}``, then the tensors' bytes back to back. ``safetensors.torch.load(bytes)`` would
    copy every tensor; views let a method copy each one once, straight into the layout it needs.
    """
    import torch

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where} is not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack_from("<Q", data)
    if size > len(data) - 8:
        raise bad(f"header length {size} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(bytes(memoryview(data)[8:8 + size]))
    except ValueError as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for key, info in header.items():
        try:
            dtype, shape = getattr(torch, _DTYPES[info["dtype"]]), [int(n) for n in info["shape"]]
            begin, stop = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has a malformed or unsupported entry {str(info)[:200]}") from None
        entries.append((begin, stop, key, dtype, shape))
    start = end = 8 + size
    tensors, flat = {}, {}  # flat: the whole buffer as each dtype, so a tensor is one as_strided view
    for begin, stop, key, dtype, shape in sorted(entries, key=lambda e: e[:2]):
        count = math.prod(shape)
        if start + begin != end or stop - begin != count * dtype.itemsize or min(shape, default=0) < 0:
            raise bad(f"tensor {key!r}: bytes {begin}..{stop} do not follow the previous tensor or fit its shape")
        end = start + stop
        if end > len(data):
            raise bad(f"tensor {key!r} runs past the end of the file")
        if count and (start + begin) % dtype.itemsize == 0:
            if dtype not in flat:
                flat[dtype] = torch.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
            strides = [1] * len(shape)
            for i in range(len(shape) - 1, 0, -1):
                strides[i - 1] = strides[i] * shape[i]
            tensor = flat[dtype].as_strided(shape, strides, (start + begin) // dtype.itemsize)
        elif count:  # unaligned: still a view, made the slower way
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        tensors[key] = tensor
    if end != len(data):
        raise bad(f"{len(data) - end} bytes after the last tensor")
    return tensors
