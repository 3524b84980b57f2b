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
from flexlora_cli.adapters import card, hub
from flexlora_cli.adapters.dense import DENSE_FILE_NAME, read_dense_delta, read_dense_layout, write_dense
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.sources import open_adapter, open_adapters
from flexlora_cli.adapters.validate import check_compatible
from flexlora_cli.adapters.write import atomic_folder, check_output, write_adapter
from flexlora_cli.aggregate_baselines import BASELINE_METHODS, aggregate_baseline
from flexlora_cli.engine import (
    Compute,
    ProgressHook,
    averaged_extras,
    check_rank_fits,
    client_factors,
    client_reports,
    client_weights,
    merged_config,
    merged_factors,
    merged_modules,
    put_factors,
    widest_dtype,
    write_client_adapters,
)
from flexlora_cli.errors import AdapterError, OptionError

AdapterSpec = str | Path | Adapter
SINGLE_INPUT_NOTE = "merging a single adapter: output equals its delta"  # allowed, but likely a slip


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
    if dense and compute.svd == "randomized":
        raise OptionError("--dense", "writes the exact full-size update; it cannot come from --svd randomized")
    if rank is not None:
        for adapter in clients:
            for module in adapter.modules.values():
                check_rank_fits(rank, module, "--rank")
    tensors, ranks, deltas, modules, tally = {}, {}, {}, [], EnergyTally()
    out_dtype = compute.output_dtype(widest_dtype(clients))
    for merged in merged_modules(clients, client_w, compute, progress, top_k=rank):
        kept, B, A = merged_factors(merged.svd, rank, compute.balanced)
        put_factors(tensors, merged.spec, B, A, out_dtype)
        ranks[merged.name] = kept
        if dense:
            deltas[merged.name] = (merged.spec.kind, merged.svd.dense().to(out_dtype).cpu())
        modules.append(_module_report(merged, kept))
        tally.add(merged.spectrum, [kept], key="kept")
    tensors.update(averaged_extras(clients, client_w, compute.output_dtype))
    config = merged_config(clients, ranks)
    readme = card.model_card(
        "merge", output.name, card.describe_inputs(clients, client_w), base_model=config.base_model_name_or_path,
        rank=card.rank_summary(ranks.values()), energy_kept=tally.overall().get("kept", 1.0),
    )
    with atomic_folder(output) as staging:
        write_adapter(staging, config, tensors, card=readme)
        if dense:
            write_dense(staging / DENSE_FILE_NAME, config, deltas)
    return {
        "command": "merge",
        "output": str(output),
        "dense_file": str(output / DENSE_FILE_NAME) if dense else None,
        "clients": client_reports(clients, client_w),
        "modules": modules,
        "energy_kept": tally.overall().get("kept", 1.0),
        **_svd_summary(compute, modules),
        "notes": [SINGLE_INPUT_NOTE] if len(clients) == 1 else [],
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
            put_factors(outputs[r], spec, B, A, compute.output_dtype(source.dtype))
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
    is_adapter = isinstance(source, _AdapterSplitSource)
    inputs = card.describe_inputs([source.adapter]) if is_adapter else [card.describe_file(source.path)]
    with atomic_folder(output) as staging:
        for r in ranks:
            config = copy.deepcopy(source.config)
            config.r, config.lora_alpha = r, alpha if alpha is not None else r
            config.rank_pattern, config.alpha_pattern, config.use_rslora = {}, {}, False
            readme = card.model_card(
                "split", f"rank {r}", inputs, base_model=config.base_model_name_or_path, rank=str(r),
                energy_kept=tally.overall().get(str(r)),
            )
            write_adapter(staging / f"rank-{r}", config, {**outputs[r], **extras}, card=readme)
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
    method: str = "flexlora",
) -> dict[str, Any]:
    """One FlexLoRA server round: merge all clients, hand each back its own rank(s) and config.

    Writes OUTPUT/<client>/ per client. `ranks` overrides the clients' ranks: one value for all,
    or one per client in order. `method` picks a baseline instead (hetlora, fedavg, or flora,
    which writes one stacked OUTPUT/global/ adapter); see flexlora_cli.aggregate_baselines.
    """
    if method != "flexlora" and method not in BASELINE_METHODS:
        raise OptionError("--method", f"must be one of flexlora, {', '.join(BASELINE_METHODS)}; got {method!r}")
    adapters, client_w, output = _prepare(clients, output, weights, num_samples, overwrite, allow_base_mismatch)
    overrides = _rank_overrides(ranks, adapters)
    for adapter, override in zip(adapters, overrides):
        if override is not None:
            for module in adapter.modules.values():
                check_rank_fits(override, module, "--ranks")
    if method != "flexlora":
        return aggregate_baseline(method, adapters, client_w, output, overrides, compute, progress)
    outputs = {adapter.name: {} for adapter in adapters}
    energy = {adapter.name: EnergyTally() for adapter in adapters}
    modules = []
    largest = max(o or m.rank for a, o in zip(adapters, overrides) for m in a.modules.values())
    for merged in merged_modules(adapters, client_w, compute, progress, top_k=largest):
        for adapter in merged.holders:
            own = adapter.modules[merged.name]
            r = overrides[adapters.index(adapter)] or own.rank
            B, A = client_factors(merged.svd, own, r, bool(adapter.config.use_rslora), compute.balanced)
            put_factors(outputs[adapter.name], own, B, A, compute.output_dtype(adapter.dtype))
            energy[adapter.name].add(merged.spectrum, [r], key="own")
        modules.append(_module_report(merged, None))
    extras = averaged_extras(adapters, client_w, compute.output_dtype)
    inputs = card.describe_inputs(adapters, client_w)
    cards = {
        adapter.name: card.model_card(
            "aggregate", adapter.name, inputs, base_model=adapter.base_model,
            rank=card.rank_summary([override] if override else [m.rank for m in adapter.modules.values()]),
            energy_kept=energy[adapter.name].overall().get("own", 1.0),
        )
        for adapter, override in zip(adapters, overrides)
    }
    with atomic_folder(output) as staging:
        write_client_adapters(staging, adapters, overrides, outputs, extras, cards)
    reports = client_reports(adapters, client_w)
    for report, adapter, override in zip(reports, adapters, overrides):
        report["output"] = str(output / adapter.name)
        report["output_ranks"] = [override] if override else report["ranks"]
        report["energy_kept"] = energy[adapter.name].overall().get("own", 1.0)
    return {"command": "aggregate", "method": "flexlora", "output": str(output), "clients": reports, "modules": modules, **_svd_summary(compute, modules)}


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


# What a --push-to-hub template may name, per command.
PUSH_FIELDS = {"merge": (), "split": ("rank",), "aggregate": ("name",)}


def check_push(command: str, repo: str, *, revision: str | None = None, create_pr: bool = False) -> None:
    """Refuse a push target that cannot work, before any computation (OptionError)."""
    hub.check_target(repo, PUSH_FIELDS[command], revision, create_pr)


def push_outputs(
    report: dict[str, Any],
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload the adapters a verb wrote (its report says where) to the Hub; add `pushed` and `commit_urls`.

    `repo` is org/name (split/aggregate outputs go into subfolders rank-<r>/ or <client>/, in one commit)
    or a template like org/client-{name} or org/global-r{rank} (each adapter to its own repo).
    """
    command = report["command"]
    check_push(command, repo, revision=revision, create_pr=create_pr)
    root = Path(report["output"])
    if command == "merge":
        folders = [root]
    elif command == "split":
        folders = [Path(folder) for folder in report["adapters"].values()]
    else:  # one folder per client, or one shared folder (e.g. a FLoRA global adapter)
        folders = list(dict.fromkeys(Path(client["output"]) for client in report["clients"]))
    items = []
    for folder in folders:
        subfolder = "" if folder == root else folder.relative_to(root).as_posix()
        fields = {"name": subfolder, "rank": subfolder.removeprefix("rank-")}
        items.append(hub.PushItem(folder, subfolder, {k: fields[k] for k in PUSH_FIELDS[command]}))
    method = f" ({report['method']})" if report.get("method") else ""
    pushed = hub.push(
        items, repo, commit_message=commit_message or f"FlexLoRA {command}{method} output",
        commit_description=f"Written by `flexlora {command}`; each adapter folder has a README.md describing its inputs.",
        private=private, revision=revision, create_pr=create_pr, token=token,
    )
    report["pushed"] = pushed
    report["commit_urls"] = [entry["url"] for entry in pushed]
    return report


def _prepare(specs, output, weights, num_samples, overwrite, allow_base_mismatch):
    adapters = open_adapters(specs)
    check_compatible(adapters, allow_base_mismatch)
    client_w = client_weights(len(adapters), weights, num_samples)
    output = Path(output)
    check_output(output, [a.path for a in adapters], overwrite)
    return adapters, client_w, output


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


def _svd_summary(compute: Compute, modules: list[dict[str, Any]]) -> dict[str, Any]:
    """The SVD mode, and the worst error a randomized SVD was measured to cost (on sampled modules)."""
    errors = [m["randomized_error"] for m in modules if m.get("randomized_error") is not None]
    return {"svd": compute.svd, "randomized_error": max(errors) if errors else None}


def _module_report(merged, kept: int | None) -> dict[str, Any]:
    report = {
        "name": merged.name,
        "path": merged.path,
        "randomized_error": merged.randomized_error,
        "numerical_rank": flexlora.numerical_rank(merged.svd),
        "clients": [a.name for a in merged.holders],
        "missing_from": merged.missing,
    }
    if kept is not None:
        report["rank"] = kept
        report["energy_kept"] = flexlora.energy_kept(merged.spectrum, kept)
    return report


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
