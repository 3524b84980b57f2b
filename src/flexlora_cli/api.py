"""The library's verbs: merge, split, aggregate, inspect. The CLI calls exactly these.

Each verb validates all inputs and the output location first, then streams module by module,
and writes its output folder atomically. Each returns a JSON-ready report (a dict).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flexlora_cli import flexlora
from flexlora_cli.adapters.dense import DENSE_FILE_NAME, read_dense_delta, read_dense_layout, write_dense
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.sources import open_adapter, open_adapters
from flexlora_cli.adapters.validate import check_compatible
from flexlora_cli.adapters.write import atomic_folder, check_output, write_adapter
from flexlora_cli.engine import (
    Compute,
    ProgressHook,
    averaged_extras,
    check_rank_fits,
    client_weights,
    merged_config,
    merged_modules,
)
from flexlora_cli.errors import AdapterError, OptionError

AdapterSpec = str | Path | Adapter


def merge(
    adapters: Sequence[AdapterSpec],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    num_samples: Sequence[float] | None = None,
    rank: int | None = None,
    dense: bool = False,
    compute: Compute = Compute(),
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    progress: ProgressHook | None = None,
) -> dict[str, Any]:
    """Merge client adapters into one LoRA adapter whose delta is the weighted sum of theirs.

    Each module gets the numerical rank of its merged update (exact), or `rank` (truncated).
    """
    clients, client_w, output = _prepare(adapters, output, weights, num_samples, overwrite, allow_base_mismatch)
    if rank is not None:
        for adapter in clients:
            for module in adapter.modules.values():
                check_rank_fits(rank, module, "--rank")
    tensors, ranks, deltas, modules, tally = {}, {}, {}, [], EnergyTally()
    out_dtype = compute.output_dtype(clients[0].dtype)
    for merged in merged_modules(clients, client_w, compute, progress):
        exact_rank = flexlora.numerical_rank(merged.svd)
        kept = rank if rank is not None else max(exact_rank, 1)
        B, A = flexlora.to_lora(flexlora.truncate(merged.svd, kept), 1.0, compute.balanced)
        _put_factors(tensors, merged.spec, B, A, out_dtype)
        ranks[merged.name] = kept
        if dense:
            deltas[merged.name] = (merged.spec.kind, merged.svd.dense().to(out_dtype).cpu())
        modules.append(_module_report(merged, kept))
        tally.add(merged.svd.S, [kept], key="kept")
    tensors.update(averaged_extras(clients, client_w, compute.output_dtype))
    config = merged_config(clients, ranks)
    with atomic_folder(output) as staging:
        write_adapter(staging, config, tensors)
        if dense:
            write_dense(staging / DENSE_FILE_NAME, config, deltas)
    return {
        "command": "merge",
        "output": str(output),
        "dense_file": str(output / DENSE_FILE_NAME) if dense else None,
        "clients": _client_reports(clients, client_w),
        "modules": modules,
        "energy_kept": tally.overall().get("kept", 1.0),
    }


def split(
    merged: AdapterSpec,
    ranks: Sequence[int],
    output: str | Path,
    *,
    alpha: float | None = None,
    compute: Compute = Compute(),
    overwrite: bool = False,
    progress: ProgressHook | None = None,
) -> dict[str, Any]:
    """Best rank-r approximations of an adapter's delta (or a --dense file's) for every r in `ranks`.

    Writes OUTPUT/rank-<r>/ for each r, with scaling alpha/r (alpha defaults to r: scaling 1).
    """
    ranks = _unique_ranks(ranks)
    if alpha is not None and not alpha > 0:
        raise OptionError("--alpha", f"must be positive, got {alpha}")
    source = _split_source(merged)
    output = Path(output)
    check_output(output, [source.path], overwrite)
    for module in source.modules.values():
        for r in ranks:
            check_rank_fits(r, module, "--ranks")
    outputs = {r: {} for r in ranks}
    reports, tally = [], EnergyTally()
    device, dtype = compute.torch_device, compute.torch_dtype
    names = sorted(source.modules)
    for index, name in enumerate(names):
        spec = source.modules[name]
        svd = source.svd(name, device, dtype)
        for r in ranks:
            scaling = flexlora.lora_scaling(alpha if alpha is not None else r, r)
            B, A = flexlora.to_lora(flexlora.truncate(svd, r), scaling, compute.balanced)
            _put_factors(outputs[r], spec, B, A, compute.output_dtype(source.dtype))
        tally.add(svd.S, ranks)
        reports.append(
            {
                "name": name,
                "numerical_rank": flexlora.numerical_rank(svd),
                "energy_kept": {str(r): flexlora.energy_kept(svd.S, r) for r in ranks},
            }
        )
        if progress:
            progress(index + 1, len(names), name)
    extras = source.extras(compute.output_dtype)
    with atomic_folder(output) as staging:
        for r in ranks:
            config = copy.deepcopy(source.config)
            config.r, config.lora_alpha = r, alpha if alpha is not None else r
            config.rank_pattern, config.alpha_pattern, config.use_rslora = {}, {}, False
            write_adapter(staging / f"rank-{r}", config, {**outputs[r], **extras})
    return {
        "command": "split",
        "source": str(merged),
        "output": str(output),
        "adapters": {str(r): str(output / f"rank-{r}") for r in ranks},
        "modules": reports,
        "energy_kept": tally.overall(),
    }


def aggregate(
    clients: Sequence[AdapterSpec],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    num_samples: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    compute: Compute = Compute(),
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    progress: ProgressHook | None = None,
) -> dict[str, Any]:
    """One FlexLoRA server round: merge all clients, hand each back its own rank(s) and config.

    Writes OUTPUT/<client>/ per client. `ranks` overrides the clients' ranks: one value for all,
    or one per client in order.
    """
    adapters, client_w, output = _prepare(clients, output, weights, num_samples, overwrite, allow_base_mismatch)
    overrides = _rank_overrides(ranks, adapters)
    for adapter, override in zip(adapters, overrides):
        if override is not None:
            for module in adapter.modules.values():
                check_rank_fits(override, module, "--ranks")
    outputs = {adapter.name: {} for adapter in adapters}
    energy = {adapter.name: EnergyTally() for adapter in adapters}
    modules = []
    for merged in merged_modules(adapters, client_w, compute, progress):
        for adapter in merged.holders:
            own = adapter.modules[merged.name]
            r = overrides[adapters.index(adapter)] or own.rank
            scaling = flexlora.lora_scaling(own.alpha, r, bool(adapter.config.use_rslora))
            B, A = flexlora.to_lora(flexlora.truncate(merged.svd, r), scaling, compute.balanced)
            _put_factors(outputs[adapter.name], own, B, A, compute.output_dtype(adapter.dtype))
            energy[adapter.name].add(merged.svd.S, [r], key="own")
        modules.append(_module_report(merged, None))
    extras = averaged_extras(adapters, client_w, compute.output_dtype)
    with atomic_folder(output) as staging:
        for adapter, override in zip(adapters, overrides):
            config = copy.deepcopy(adapter.config)
            if override is not None:
                config.r, config.rank_pattern = override, {}
            own_extras = {k: v for k, v in extras.items() if k in adapter.extra_keys}
            write_adapter(staging / adapter.name, config, {**outputs[adapter.name], **own_extras})
    reports = _client_reports(adapters, client_w)
    for report, adapter, override in zip(reports, adapters, overrides):
        report["output"] = str(output / adapter.name)
        report["output_ranks"] = [override] if override else report["ranks"]
        report["energy_kept"] = energy[adapter.name].overall().get("own", 1.0)
    return {"command": "aggregate", "method": "flexlora", "output": str(output), "clients": reports, "modules": modules}


def inspect(adapters: Sequence[AdapterSpec], spectrum: Sequence[int] | None = None, progress: ProgressHook | None = None) -> list[dict[str, Any]]:
    """Describe adapters; with `spectrum`, the share of each module's energy kept at those ranks."""
    loaded = open_adapters(adapters)
    reports = []
    for adapter in loaded:
        modules = adapter.modules.values()
        report = {
            "name": adapter.name,
            "source": adapter.source,
            "base_model": adapter.base_model,
            "peft_type": "LORA",
            "ranks": sorted({m.rank for m in modules}),
            "alphas": sorted({m.alpha for m in modules}),
            "scalings": sorted({m.scaling for m in modules}),
            "use_rslora": bool(adapter.config.use_rslora),
            "fan_in_fan_out": adapter.fan_in_fan_out,
            "target_modules": sorted(adapter.config.target_modules) if isinstance(adapter.config.target_modules, (set, list)) else adapter.config.target_modules,
            "modules": len(adapter.modules),
            "modules_to_save": list(adapter.config.modules_to_save or []),
            "dtype": str(adapter.dtype).removeprefix("torch."),
            "parameters": adapter.parameter_count,
            "file": str(adapter.weights_path),
            "file_size": adapter.file_size,
        }
        if spectrum:
            report["spectrum"] = _spectrum(adapter, _unique_ranks(spectrum), progress)
        reports.append(report)
    return reports


def _prepare(specs, output, weights, num_samples, overwrite, allow_base_mismatch):
    adapters = open_adapters(specs)
    check_compatible(adapters, allow_base_mismatch)
    client_w = client_weights(len(adapters), weights, num_samples)
    output = Path(output)
    check_output(output, [a.path for a in adapters], overwrite)
    return adapters, client_w, output


def _put_factors(tensors: dict, spec: LoraModule, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> None:
    tensors[spec.b_key] = B.to(dtype=dtype, device="cpu").contiguous()
    tensors[spec.a_key] = A.to(dtype=dtype, device="cpu").contiguous()


class EnergyTally:
    """Share of squared Frobenius norm kept at given ranks, summed over modules."""

    def __init__(self):
        self.kept: dict[str, float] = {}
        self.total: dict[str, float] = {}

    def add(self, S: torch.Tensor, ranks: Sequence[int], key: str | None = None) -> None:
        squares = S.double() ** 2
        for r in ranks:
            name = key or str(r)
            self.kept[name] = self.kept.get(name, 0.0) + float(squares[:r].sum())
            self.total[name] = self.total.get(name, 0.0) + float(squares.sum())

    def overall(self) -> dict[str, float]:
        return {k: self.kept[k] / self.total[k] if self.total[k] else 1.0 for k in self.kept}


def _spectrum(adapter: Adapter, ranks: list[int], progress: ProgressHook | None) -> dict[str, Any]:
    """Energy of each module's own delta kept at each rank, in fp64."""
    modules, tally = {}, EnergyTally()
    names = sorted(adapter.modules)
    for index, name in enumerate(names):
        B, A = adapter.factors(name)
        svd = flexlora.factored_svd(B.double() * adapter.modules[name].scaling, A.double())
        modules[name] = {str(r): flexlora.energy_kept(svd.S, r) for r in ranks}
        tally.add(svd.S, ranks)
        if progress:
            progress(index + 1, len(names), name)
    return {"overall": tally.overall(), "modules": modules}


def _module_report(merged, kept: int | None) -> dict[str, Any]:
    report = {
        "name": merged.name,
        "numerical_rank": flexlora.numerical_rank(merged.svd),
        "clients": [a.name for a in merged.holders],
        "missing_from": merged.missing,
    }
    if kept is not None:
        report["rank"] = kept
        report["energy_kept"] = flexlora.energy_kept(merged.svd.S, kept)
    return report


def _client_reports(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[dict[str, Any]]:
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


def _unique_ranks(ranks: Sequence[int]) -> list[int]:
    if not ranks:
        raise OptionError("--ranks", "give at least one rank")
    bad = [r for r in ranks if not isinstance(r, int) or r <= 0]
    if bad:
        raise OptionError("--ranks", f"ranks must be positive integers, got {bad[0]!r}")
    return sorted(set(ranks))


def _rank_overrides(ranks: Sequence[int] | None, adapters: Sequence[Adapter]) -> list[int | None]:
    if not ranks:
        return [None] * len(adapters)
    _unique_ranks(ranks)
    if len(ranks) == 1:
        return [ranks[0]] * len(adapters)
    if len(ranks) != len(adapters):
        raise OptionError("--ranks", f"give one rank for all clients or one per client; got {len(ranks)} for {len(adapters)} clients")
    return list(ranks)


class _AdapterSplitSource:
    """A LoRA adapter as the thing to split: each module's delta is scaling * B @ A."""

    def __init__(self, adapter: Adapter):
        self.adapter, self.path, self.config = adapter, adapter.path, adapter.config
        self.modules, self.dtype = adapter.modules, adapter.dtype

    def svd(self, name, device, dtype) -> flexlora.LowRank:
        B, A = self.adapter.factors(name)
        scaling = self.modules[name].scaling
        return flexlora.factored_svd(B.to(device, dtype) * scaling, A.to(device, dtype))

    def extras(self, dtype_for) -> dict[str, torch.Tensor]:
        return {k: self.adapter.tensor(k).to(dtype_for(self.adapter.tensor(k).dtype)) for k in self.adapter.extra_keys}


class _DenseSplitSource:
    """A `merge --dense` file as the thing to split: each module's delta is stored in full."""

    def __init__(self, path: Path):
        self.path = path
        self.config, self.layout = read_dense_layout(path)
        self.dtype = torch.float32
        self.modules = {
            name: LoraModule(name, info["kind"], 1, 1.0, 1.0, info["shape"][0], info["shape"][1])
            for name, info in self.layout.items()
        }

    def svd(self, name, device, dtype) -> flexlora.LowRank:
        delta = read_dense_delta(self.path, name, self.layout[name])
        self.dtype = delta.dtype
        return flexlora.dense_svd(delta.to(device, dtype))

    def extras(self, dtype_for) -> dict[str, torch.Tensor]:
        return {}


def _split_source(spec: AdapterSpec):
    if not isinstance(spec, Adapter):
        path = Path(str(spec))
        if path.is_file():
            if path.suffix != ".safetensors":
                raise AdapterError(spec, "expected an adapter folder or a flexlora --dense .safetensors file")
            return _DenseSplitSource(path)
    return _AdapterSplitSource(open_adapter(spec))
