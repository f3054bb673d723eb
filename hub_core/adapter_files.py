"""An adapter's files read once into memory: the input of :meth:`Method.serving_form_from_files`.

The server reads each file of a registry version exactly once and checks those same bytes against
the version's sha256 in a background thread while the method builds its serving form from them;
the form is used only after every check passed. So a method that builds its form from these bytes
never reads the disk a second time, and nothing separates the bytes checked from the bytes used.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import NotFound

WEIGHTS_FILE = "adapter_model.safetensors"

if TYPE_CHECKING:
    import torch


class AdapterFiles:
    """An adapter version's files as bytes, by file name (``adapter_config.json``, ...).

    Read them with :meth:`read_bytes`, :meth:`read_json` and :meth:`read_tensors`. ``directory`` is
    where the files lie on disk, for code that must read them itself: on the server, asking for it
    waits until every file passed its hash check, so such code never reads an unchecked file (what
    :meth:`Method.serving_form` always got).
    """

    def __init__(self, data: Mapping[str, bytes], directory: str | Path, *, check: Callable[[], None] = lambda: None,
                 check_directory: Callable[[], None] = lambda: None):
        self._data = dict(data)
        self._directory = Path(directory)
        self._check = check
        self._check_directory = check_directory
        self._checked = False
        self._directory_checked = False
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
        if not self._directory_checked:
            self._check_directory()
            self._directory_checked = True
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

    def read_bytes(self, name: str) -> bytes:
        """A file's bytes; NotFound naming the files there are."""
        if name not in self._data and self._from_disk and (self._directory / name).is_file():
            self._data[name] = (self._directory / name).read_bytes()
        try:
            return self._data[name]
        except KeyError:
            raise NotFound(f"adapter {self._directory} has no file {name!r} (files: {', '.join(self.names())})") from None

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_tensors(self, name: str = WEIGHTS_FILE) -> dict[str, "torch.Tensor"]:
        """The tensors of a safetensors file (``safetensors.torch.load`` of its bytes: copies)."""
        from safetensors.torch import load

        return load(bytes(self.read_bytes(name)))

    def tensor_views(self, name: str = WEIGHTS_FILE) -> dict[str, "torch.Tensor"]:
        """The tensors of a safetensors file as views of the bytes read (no copy), for a form that
        copies each tensor once anyway, straight into its final layout (the server's LoRA load:
        ``safetensors.torch.load`` copies every tensor first, about a third of that load's time).
        The views keep the file's bytes alive; copy what you keep."""
        data = self.read_bytes(name)
        if not isinstance(data, bytearray):  # read-only bytes: frombuffer needs a writable buffer
            data = self._data[name] = bytearray(data)
        return parse_safetensors(data, str(self._directory / name))



# safetensors dtype names (the format's spec) -> torch dtype names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@functools.cache
def _torch_dtypes() -> dict[str, tuple["torch.dtype", int]]:
    import torch

    return {name: (getattr(torch, dtype), getattr(torch, dtype).itemsize) for name, dtype in _DTYPES.items()}


def parse_safetensors(data: bytearray, where: str) -> dict[str, "torch.Tensor"]:
    """The tensors of a safetensors file held in ``data``, as views of it.

    The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets}}`` (and ``__metadata__``), then the tensors' bytes back to back. Anything else
    is an IntegrityError naming the file and what is wrong. On a hot-swap's path: one pass over
    the entries, a view each (84 for a rank-16 LoRA on every linear layer of a 6-layer model).
    """
    import torch

    from .errors import IntegrityError

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where} is not a valid safetensors file: {why}")

    if sys.byteorder != "little":
        raise bad("views of little-endian tensors need a little-endian machine; use read_tensors")
    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack_from("<Q", data)
    if size > len(data) - 8:
        raise bad(f"header length {size} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except ValueError as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    dtypes = _torch_dtypes()
    try:
        entries = sorted((info["data_offsets"], key, info["dtype"], info["shape"]) for key, info in header.items())
    except (KeyError, TypeError):
        raise bad("an entry is not {dtype, shape, data_offsets}") from None
    start = end = 8 + size
    tensors = {}
    bases: dict[Any, Any] = {}  # dtype -> the data section as one flat tensor of it (None: unaligned)
    for offsets, key, dtype_name, shape in entries:
        try:
            dtype, itemsize = dtypes[dtype_name]
            begin, stop = offsets
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has a malformed or unsupported entry {str(header[key])[:200]}") from None
        if (start + begin != end or stop - begin != count * itemsize or type(begin) is not int or type(stop) is not int
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise bad(f"tensor {key!r}: bytes {begin}..{stop} do not follow the previous tensor or fit its shape")
        end = start + stop
        if end > len(data):
            raise bad(f"tensor {key!r} runs past the end of the file")
        tensors[key] = _view(data, bases, start, begin, dtype, itemsize, shape, count)
    if end != len(data):
        raise bad(f"{len(data) - end} bytes after the last tensor")
    return tensors


def _view(data: bytearray, bases: dict, start: int, begin: int, dtype, itemsize: int, shape: list[int], count: int):
    """A tensor of ``shape`` over ``data[start + begin:]``: a strided view of one flat tensor per
    dtype (one call, a third of ``frombuffer(...).view(shape)``), or that pair where unaligned."""
    import torch

    if not count:
        return torch.empty(shape, dtype=dtype)
    base = bases.get(dtype, False)
    if base is False:
        aligned = start % itemsize == 0 and (len(data) - start) % itemsize == 0
        base = bases[dtype] = torch.frombuffer(data, dtype=dtype, offset=start) if aligned else None
    if base is None or begin % itemsize:
        return torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).view(shape)
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return base.as_strided(shape, strides[::-1], begin // itemsize)
