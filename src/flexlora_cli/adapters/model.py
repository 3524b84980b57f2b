"""What a loaded PEFT LoRA adapter is, apart from its file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flexlora_cli.adapters.tensors import TensorFile

if TYPE_CHECKING:
    from flexlora_cli.adapters.config import AdapterConfig

# Saved PEFT state dicts name every tensor "base_model.model.<module path>.<suffix>".
KEY_PREFIX = "base_model.model."
LINEAR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors live and how PEFT scales them."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" (also Conv1D) or "embedding"
    rank: int
    alpha: float
    scaling: float
    d_out: int  # rows of B
    d_in: int  # columns of A

    @property
    def a_key(self) -> str:
        return KEY_PREFIX + self.name + _suffixes(self.kind)[0]

    @property
    def b_key(self) -> str:
        return KEY_PREFIX + self.name + _suffixes(self.kind)[1]


@dataclass
class Adapter:
    """A validated LoRA adapter whose tensors are read lazily, one module at a time."""

    name: str  # client name (folder name, or chosen with name=path)
    source: str  # what the user passed: a folder, or a Hub reference
    path: Path  # local folder
    weights: TensorFile  # the weight file, indexed; tensors are read from it on demand
    config: AdapterConfig
    modules: dict[str, LoraModule]
    extra_keys: list[str]  # non-LoRA tensors, e.g. modules_to_save
    dtype: torch.dtype
    provenance: dict = field(default_factory=dict)  # e.g. Hub repo id and revision

    @property
    def base_model(self) -> str | None:
        return self.config.base_model_name_or_path

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.fan_in_fan_out)

    @property
    def weights_path(self) -> Path:
        return self.weights.path

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor of the weight file, checked to be finite."""
        return self.weights.read(key)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one module."""
        spec = self.modules[module]
        return self.tensor(spec.b_key), self.tensor(spec.a_key)

    @property
    def file_size(self) -> int:
        return self.weights_path.stat().st_size

    @property
    def parameter_count(self) -> int:
        return sum(m.rank * (m.d_in + m.d_out) for m in self.modules.values())


def _suffixes(kind: str) -> tuple[str, str]:
    return EMBEDDING_SUFFIXES if kind == "embedding" else LINEAR_SUFFIXES
