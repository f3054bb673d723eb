"""An adapter's files read once into memory: the input of :meth:`Method.serving_form_from_files`.

The server reads each file of a registry version exactly once and checks those same bytes against
the version's sha256 in a background thread while the method builds its serving form from them;
the form is used only after every check passed. So a method that builds its form from these bytes
never reads the disk a second time, and nothing separates the bytes checked from the bytes used.
"""

from __future__ import annotations

import json
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

    def __init__(self, data: Mapping[str, bytes], directory: str | Path, *, check: Callable[[], None] = lambda: None):
        self._data = dict(data)
        self._directory = Path(directory)
        self._check = check
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

        return load(self.read_bytes(name))

