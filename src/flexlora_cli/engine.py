"""Shared plumbing of the verbs: compute settings, client weights, streaming modules through the math."""

from __future__ import annotations

import copy
import functools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from flexlora_cli import flexlora, svd_paths
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.write import write_adapter
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
    svd: str = "exact"  # or "randomized": only the top components a verb asks for (svd_paths)
    path: str = "auto"  # SVD path per module: auto (cost model) or one of svd_paths.EXACT_PATHS

    def __post_init__(self):
        if self.svd not in svd_paths.SVD_MODES:
            raise OptionError("--svd", f"must be one of {list(svd_paths.SVD_MODES)}, got {self.svd!r}")
        if self.path not in svd_paths.PATH_CHOICES:
            raise OptionError("--svd-path", f"must be one of {list(svd_paths.PATH_CHOICES)}, got {self.path!r}")
        if self.svd == "randomized" and self.path == "incremental":
            raise OptionError("--svd-path", "the randomized SVD runs on the stacked or dense operator, not incremental")
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


def widest_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The dtype that holds every input exactly (bf16 + fp16 -> fp32): for outputs shared by all clients."""
    return functools.reduce(torch.promote_types, (adapter.dtype for adapter in adapters))


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
    path: str = "stacked"  # the SVD path svd_paths chose (or was told) for this module
    randomized_error: float | None = None  # vs the exact truncation at top_k, on sampled modules only

    @property
    def spectrum(self) -> torch.Tensor:
        """Singular values for energy shares; a randomized SVD's left-out energy comes as one more value."""
        return self.svd.spectrum if isinstance(self.svd, svd_paths.TruncatedSVD) else self.svd.S


def module_names(adapters: Sequence[Adapter]) -> list[str]:
    return sorted(set().union(*(adapter.modules for adapter in adapters)))


def merged_modules(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    compute: Compute,
    progress: ProgressHook | None = None,
    top_k: int | None = None,
) -> Iterator[MergedModule]:
    """Stream the model module by module: read only this module's factors, merge, move on.

    Each module's SVD path comes from svd_paths' cost model (or compute.path); clients are read
    lazily inside it, one at a time. `top_k` is the largest rank the caller will take from any
    module: with compute.svd == "randomized" only that many components are computed, and the
    error against the exact truncation is measured on a few evenly spaced modules.
    """
    if compute.svd == "randomized" and top_k is None:
        raise OptionError("--svd", "randomized needs the rank to keep (e.g. merge --rank); the exact SVD does not")
    names = module_names(adapters)
    device, dtype = compute.torch_device, compute.torch_dtype
    checked = {round(i * (len(names) - 1) / max(_RANDOMIZED_CHECKS - 1, 1)) for i in range(_RANDOMIZED_CHECKS)}
    for index, name in enumerate(names):
        holders = [(a, w) for a, w in zip(adapters, weights) if name in a.modules]
        spec = holders[0][0].modules[name]
        shape, ranks = (spec.d_out, spec.d_in), [a.modules[name].rank for a, _ in holders]
        terms = _client_terms(holders, name, device)
        plan = _plan(compute, shape, ranks, top_k)
        svd = svd_paths.run_path(plan, terms, shape, dtype, device)
        error = None
        if not plan.exact and index in checked:
            exact = svd_paths.run_path(_plan(compute, shape, ranks, None), terms, shape, dtype, device)
            error = svd_paths.truncation_error(svd, exact, plan.top_k)
        yield MergedModule(
            name=name,
            spec=spec,
            svd=svd,
            holders=[a for a, _ in holders],
            missing=[a.name for a in adapters if name not in a.modules],
            path=plan.path,
            randomized_error=error,
        )
        if progress:
            progress(index + 1, len(names), name)


# Modules on which a randomized SVD is also run exactly, to report the error it cost.
_RANDOMIZED_CHECKS = 3


def _plan(compute: Compute, shape: tuple[int, int], ranks: list[int], top_k: int | None) -> svd_paths.PathPlan:
    randomized = compute.svd == "randomized" and top_k is not None
    rates = svd_paths.CUDA_RATES if compute.torch_device.type == "cuda" else svd_paths.CPU_RATES
    itemsize = torch.empty((), dtype=compute.torch_dtype).element_size()
    return svd_paths.choose_path(
        *shape, ranks, svd="randomized" if randomized else "exact", top_k=top_k if randomized else None,
        path=compute.path, itemsize=itemsize, rates=rates,
    )


def _client_terms(holders: list[tuple[Adapter, float]], name: str, device: torch.device):
    """A fresh generator per pass of each client's term for one module, read lazily from its file."""

    def terms() -> Iterator[flexlora.LoraTerm]:
        for adapter, weight in holders:
            B, A = adapter.factors(name)
            yield flexlora.LoraTerm(B.to(device), A.to(device), weight * adapter.modules[name].scaling)

    return terms


def check_rank_fits(rank: int, module: LoraModule, source: object) -> None:
    """A rank the user asks for must fit every module (a client's own trained rank need not)."""
    if rank <= 0:
        raise OptionError(source, f"must be a positive integer, got {rank}")
    limit = min(module.d_out, module.d_in)
    if rank > limit:
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


def put_factors(tensors: dict, spec: LoraModule, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> None:
    """Store one module's factors under PEFT's key names, on the CPU, in the output dtype."""
    tensors[spec.b_key] = B.to(dtype=dtype, device="cpu").contiguous()
    tensors[spec.a_key] = A.to(dtype=dtype, device="cpu").contiguous()


def merged_factors(svd: flexlora.LowRank, rank: int | None, balanced: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The merged update as LoRA factors with scaling 1: at `rank`, or at its numerical rank (exact)."""
    kept = rank if rank is not None else max(flexlora.numerical_rank(svd), 1)
    B, A = flexlora.to_lora(flexlora.truncate(svd, kept), 1.0, balanced)
    return kept, B, A


def client_factors(
    svd: flexlora.LowRank, module: LoraModule, rank: int, use_rslora: bool, balanced: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA's redistribution: the best rank-`rank` approximation, at the client's own scaling."""
    scaling = flexlora.lora_scaling(module.alpha, rank, use_rslora)
    return flexlora.to_lora(flexlora.truncate(svd, rank), scaling, balanced)


def client_config(adapter: Adapter, rank_override: int | None) -> LoraConfig:
    """The client's own config for its next round, with its rank replaced if asked."""
    config = copy.deepcopy(adapter.config)
    if rank_override is not None:
        config.r, config.rank_pattern = rank_override, {}
    return config


def write_client_adapters(
    folder: Path,
    adapters: Sequence[Adapter],
    overrides: Sequence[int | None],
    outputs: dict[str, dict[str, torch.Tensor]],
    extras: dict[str, torch.Tensor],
    cards: dict[str, str] | None = None,
) -> None:
    """folder/<client>/ per client: its own config (rank overridden if asked), its new factors, and
    the averaged non-LoRA tensors it had."""
    for adapter, override in zip(adapters, overrides):
        own_extras = {key: value for key, value in extras.items() if key in adapter.extra_keys}
        card = (cards or {}).get(adapter.name)
        write_adapter(folder / adapter.name, client_config(adapter, override), {**outputs[adapter.name], **own_extras}, card)


def client_reports(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[dict]:
    return [
        {
            "name": a.name,
            "source": a.source,
            "weight": w,
            "ranks": sorted({m.rank for m in a.modules.values()}),
            "modules": len(a.modules),
            **({"provenance": a.provenance} if a.provenance else {}),
        }
        for a, w in zip(adapters, weights)
    ]
