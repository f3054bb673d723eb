"""An adapter's files read once into memory: the input of :meth:`Method.serving_form`.

The server reads each file of a registry version exactly once and checks those same bytes against
the version's sha256 in a background thread while the method builds its serving form from them;
the form is used only after every check passed. So a method that builds its form from these bytes
never reads the disk a second time, and nothing separates the bytes checked from the bytes used.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import IntegrityError, NotFound

WEIGHTS_FILE = "adapter_model.safetensors"
# Formats that run code when loaded (pickle and its wrappers): refused by the loader and the registry
# alike. Safetensors is the only weight format.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

if TYPE_CHECKING:
    import torch


class AdapterFiles:
    """An adapter version's files as bytes, by file name (``adapter_config.json``, ...).

    Read them with :meth:`read_bytes`, :meth:`read_json` and :meth:`read_tensors`. ``directory`` is
    where the files lie on disk, for code that must read them itself: on the server, asking for it
    waits until every file passed its hash check, so such code never reads an unchecked file.
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

    def directory_later(self) -> Callable[[], Path]:
        """:attr:`directory` as a call for later that holds none of the bytes read (what a cache
        keeps: checking the directory costs a listing and two JSON renderings, which a load whose
        form came from the bytes does not need)."""
        self.check()
        directory, check_directory = self._directory, (lambda: None) if self._directory_checked else self._check_directory

        @functools.cache
        def checked() -> Path:
            check_directory()
            return directory

        return checked

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

    def tensor_views(self, name: str = WEIGHTS_FILE) -> "TensorViews":
        """The tensors of a safetensors file as views of the bytes read (no copy), each made when
        first asked for, for a form that copies each tensor once anyway, straight into its final
        layout (the server's LoRA load: ``safetensors.torch.load`` copies every tensor first, about
        a third of that load's time). The views keep the file's bytes alive; copy what you keep."""
        data = self.read_bytes(name)
        if not isinstance(data, bytearray):  # read-only bytes: frombuffer needs a writable buffer
            data = self._data[name] = bytearray(data)
        return TensorViews(data, str(self._directory / name))


# safetensors dtype names (the format's spec) -> torch dtype names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@functools.cache
def _torch_dtypes() -> dict[str, tuple["torch.dtype", int]]:
    import torch

    return {name: (getattr(torch, dtype), getattr(torch, dtype).itemsize) for name, dtype in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """Where a tensor's bytes lie in memory, for C code that reads them in place (row-major)."""

    address: int
    dtype: "torch.dtype"
    shape: tuple[int, ...]


class TensorViews(Mapping[str, "torch.Tensor"]):
    """The tensors of a safetensors file held in ``data``: views of it, each made when first asked
    for, or :meth:`raw` (where its bytes lie) for code that needs no tensor at all.

    The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets}}`` (and ``__metadata__``), then the tensors' bytes back to back. Anything else
    is an IntegrityError naming the file and what is wrong, raised here, before any byte is read
    through an entry. On a hot-swap's path: one pass over the entries, no tensor made (84 views of
    a rank-16 LoRA on every linear layer of a 6-layer model cost as much as the rest of its load).
    """

    def __init__(self, data: bytearray, where: str):
        import torch

        self._data = data
        self._entries = _index(data, where)  # name -> (dtype, itemsize, shape, start, count)
        self._views: dict[str, torch.Tensor] = {}
        self._bases: dict[Any, Any] = {}  # dtype -> the buffer as one flat tensor of it (None: unaligned)
        self._bytes = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)

    def __getitem__(self, name: str) -> "torch.Tensor":
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self._view(*self._entries[name])
        return view

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:  # without making the view
        return name in self._entries

    def raw(self, name: str) -> RawTensor:
        dtype, _, shape, start, _ = self._entries[name]
        return RawTensor(self._bytes.data_ptr() + start, dtype, shape)

    def _view(self, dtype, itemsize: int, shape: tuple[int, ...], start: int, count: int) -> "torch.Tensor":
        """A strided view of one flat tensor per dtype (one call, a third of ``frombuffer(...).view(shape)``),
        or that pair where unaligned."""
        import torch

        if not count:
            return torch.empty(shape, dtype=dtype)
        base = self._bases.get(dtype, False)
        if base is False:
            base = self._bases[dtype] = (torch.frombuffer(self._data, dtype=dtype) if len(self._data) % itemsize == 0
                                         else None)
        if base is None or start % itemsize:
            return torch.frombuffer(self._data, dtype=dtype, count=count, offset=start).view(shape)
        strides, step = [], 1
        for n in reversed(shape):
            strides.append(step)
            step *= n
        return base.as_strided(shape, strides[::-1], start // itemsize)


def _index(data: bytearray, where: str) -> dict[str, tuple]:
    """Name -> (dtype, itemsize, shape, first byte, element count) of each tensor, every entry checked."""

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
    index = {}
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
        index[key] = (dtype, itemsize, tuple(shape), start + begin, count)
    if end != len(data):
        raise bad(f"{len(data) - end} bytes after the last tensor")
    return index
