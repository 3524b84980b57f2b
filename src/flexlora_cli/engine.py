"""Shared plumbing of the verbs: compute settings, client weights, streaming modules through the math."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig

from flexlora_cli import flexlora
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.errors import OptionError

# (modules done, modules in all, current module) -> None; the CLI draws a progress bar with it.
ProgressHook = Callable[[int, int, str], None]

_PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass(frozen=True)
class Compute:
    """Where and how precisely to compute, and which dtype to write."""

    precision: str = "fp32"
    device: str = "auto"
    dtype: str | None = None  # output dtype; None keeps each input's dtype
    balanced: bool = False  # sqrt(S) on both factors instead of S in B

    def __post_init__(self):
        if self.precision not in _PRECISIONS:
            raise OptionError("--precision", f"must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise OptionError("--dtype", f"must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise OptionError("--device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("--device", f"{self.device} was asked for but no CUDA device is available")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _PRECISIONS[self.precision]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def output_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return _DTYPES[self.dtype] if self.dtype else input_dtype


def client_weights(
    count: int, weights: Sequence[float] | None = None, num_samples: Sequence[float] | None = None
) -> list[float]:
    """Normalized aggregation weights: explicit weights, else sample counts, else uniform."""
    if weights is not None and num_samples is not None:
        raise OptionError("--weights", "give either --weights or --num-samples, not both")
    option, values = ("--num-samples", num_samples) if num_samples is not None else ("--weights", weights)
    try:
        return flexlora.normalize_weights(values, count)
    except ValueError as error:
        raise OptionError(option, str(error)) from None


@dataclass
class MergedModule:
    """One module's merged update, as its exact SVD, and who contributed to it."""

    name: str
    spec: LoraModule  # layout (kind, shape) as the first contributing client has it
    svd: flexlora.LowRank
    holders: list[Adapter]
    missing: list[str]  # names of clients that did not adapt this module


def module_names(adapters: Sequence[Adapter]) -> list[str]:
    return sorted(set().union(*(adapter.modules for adapter in adapters)))


def merged_modules(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    compute: Compute,
    progress: ProgressHook | None = None,
) -> Iterator[MergedModule]:
    """Stream the model module by module: read only this module's factors, merge, move on."""
    names = module_names(adapters)
    device, dtype = compute.torch_device, compute.torch_dtype
    for index, name in enumerate(names):
        holders = [(a, w) for a, w in zip(adapters, weights) if name in a.modules]
        terms = []
        for adapter, weight in holders:
            B, A = adapter.factors(name)
            scaling = adapter.modules[name].scaling
            terms.append(flexlora.LoraTerm(B.to(device), A.to(device), weight * scaling))
        svd = flexlora.merge(terms, dtype)
        yield MergedModule(
            name=name,
            spec=holders[0][0].modules[name],
            svd=svd,
            holders=[a for a, _ in holders],
            missing=[a.name for a in adapters if name not in a.modules],
        )
        if progress:
            progress(index + 1, len(names), name)


def check_rank_fits(rank: int, module: LoraModule, source: object) -> None:
    limit = min(module.d_out, module.d_in)
    if rank <= 0 or rank > limit:
        raise OptionError(source, f"rank {rank} does not fit module {module.name} ({module.d_out}x{module.d_in}, at most {limit})")


def averaged_extras(
    adapters: Sequence[Adapter], weights: Sequence[float], dtype_for: Callable[[torch.dtype], torch.dtype]
) -> dict[str, torch.Tensor]:
    """Weighted average of non-LoRA tensors (modules_to_save, ...) over the clients that have them."""
    result = {}
    keys = sorted(set().union(*(adapter.extra_keys for adapter in adapters)))
    for key in keys:
        holders = [(a, w) for a, w in zip(adapters, weights) if key in a.extra_keys]
        total = sum(w for _, w in holders) or 1.0
        tensors = [(a.tensor(key), w) for a, w in holders]
        shapes = {tuple(t.shape) for t, _ in tensors}
        if len(shapes) > 1:
            raise OptionError(holders[0][0].source, f"tensor {key} has different shapes across clients: {sorted(shapes)}")
        average = sum(t.double() * (w / total) for t, w in tensors)
        result[key] = average.to(dtype_for(tensors[0][0].dtype))
    return result


def merged_config(adapters: Sequence[Adapter], ranks: dict[str, int]) -> LoraConfig:
    """Config of a merged adapter: per-module rank `ranks[m]`, scaling 1 everywhere."""
    config = copy.deepcopy(adapters[0].config)
    counts = Counter(ranks.values())
    default = max(counts, key=lambda rank: (counts[rank], rank))  # most common; ties: the larger
    pattern = {name: rank for name, rank in ranks.items() if rank != default}
    config.r = default
    config.lora_alpha = default
    config.rank_pattern = pattern
    config.alpha_pattern = dict(pattern)
    config.use_rslora = False
    config.target_modules = _union_targets(adapters, ranks)
    config.layers_to_transform = None
    config.layers_pattern = None
    config.modules_to_save = _union_modules_to_save(adapters)
    return config


def _union_targets(adapters: Sequence[Adapter], ranks: dict[str, int]):
    """Keep the clients' target_modules where they all agree; else name every module explicitly."""
    targets = [adapter.config.target_modules for adapter in adapters]
    plain = all(isinstance(t, (set, list)) and a.config.layers_to_transform is None for t, a in zip(targets, adapters))
    if plain and all(set(t) == set(targets[0]) for t in targets):
        return set(targets[0])
    return set(ranks)


def _union_modules_to_save(adapters: Sequence[Adapter]) -> list[str] | None:
    names = sorted(set().union(*(adapter.config.modules_to_save or [] for adapter in adapters)))
    return names or None
