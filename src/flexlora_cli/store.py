"""Where a round keeps each module's result between computing it and writing the outputs.

A client's adapter is complete only after the round's last module, so every module's result must
be kept until the writing starts. The store holds results in memory up to a byte budget and spills
the rest to a folder (the output's hidden staging folder) as safetensors files, read back lazily
one module at a time. Memory then stays at the budget plus one output being written, however many
modules and clients the round has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexlora_cli.methods.base import FactorUpdate, ModuleUpdate, SvdUpdate

DEFAULT_BUDGET = 1 << 30  # bytes of results held in memory before spilling (1 GiB)
_KINDS = {"svd": SvdUpdate, "factors": FactorUpdate}
_INFO_KEY = "flexlora.info"
_KIND_KEY = "flexlora.kind"


class UpdateStore:
    """Module name -> ModuleUpdate (or a dict of plain tensors), in memory up to `budget` bytes, then on disk.

    Spilled entries live in `folder` (created on first spill); without a folder nothing is spilled.
    """

    def __init__(self, folder: Path | None = None, budget: int = DEFAULT_BUDGET):
        self.folder = folder
        self.budget = budget
        self.held = 0
        self._memory: dict[str, ModuleUpdate | dict[str, torch.Tensor]] = {}
        self._files: dict[str, Path] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._memory or name in self._files

    def names(self) -> Iterable[str]:
        return [*self._memory, *self._files]

    def put(self, name: str, entry: ModuleUpdate | dict[str, torch.Tensor]) -> None:
        tensors = entry if isinstance(entry, dict) else entry.tensors()
        tensors = {key: _own(tensor) for key, tensor in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.folder is None or self.held + size <= self.budget:
            self.held += size
            self._memory[name] = _rebuilt(entry, tensors)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self._files):06d}.safetensors"
        metadata = {"format": "pt"}
        if not isinstance(entry, dict):
            kind = next(key for key, cls in _KINDS.items() if isinstance(entry, cls))
            metadata |= {_KIND_KEY: kind, _INFO_KEY: json.dumps(entry.info, default=float)}
        save_file(tensors, str(path), metadata=metadata)
        self._files[name] = path

    def get(self, name: str) -> ModuleUpdate | dict[str, torch.Tensor]:
        if name in self._memory:
            return self._memory[name]
        with safe_open(self._files[name], framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        if _KIND_KEY not in metadata:
            return tensors
        return _KINDS[metadata[_KIND_KEY]].from_tensors(tensors, json.loads(metadata[_INFO_KEY]))

    def clear(self) -> None:
        """Forget everything and delete the spill files."""
        self._memory.clear()
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        self.held = 0
        if self.folder is not None and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the CPU, contiguous, in storage of its own size.

    A kept update is often a slice of a larger one (the first k rows of Vh): such a view is already
    contiguous, and keeping it would keep the whole full-rank matrix alive (all of a round's modules
    at full rank, not at the rank written).
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _rebuilt(entry, tensors):
    """The entry with its tensors moved to the CPU (a result computed on a GPU must not hold GPU memory)."""
    if isinstance(entry, dict):
        return tensors
    return type(entry).from_tensors(tensors, entry.info)

