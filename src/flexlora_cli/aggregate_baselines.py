"""`aggregate --method hetlora|fedavg|flora`: the baseline server rounds, for comparing with FlexLoRA.

Same contract as api.aggregate: validate everything, stream module by module (only one module's
factors in memory), write the output folder atomically, return a JSON-ready report.

- hetlora / fedavg write OUTPUT/<client>/ per client with the raw averaged factors and the
  client's own config, so PEFT applies each client's own scaling to them (as in the papers).
- flora writes one stacked global adapter OUTPUT/global/ (rank sum_i r_i per module, scaling 1)
  whose delta is exactly sum_i w_i s_i B_i A_i. FLoRA has no per-client redistribution: clients
  merge the global adapter into their base weights and start fresh LoRA factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora_cli import baselines, flexlora
from flexlora_cli.adapters.model import Adapter
from flexlora_cli.adapters.write import atomic_folder, write_adapter
from flexlora_cli.engine import (
    Compute,
    ProgressHook,
    averaged_extras,
    client_reports,
    merged_config,
    module_names,
    put_factors,
    widest_dtype,
    write_client_adapters,
)
from flexlora_cli.errors import IncompatibleAdaptersError, OptionError

BASELINE_METHODS = ("hetlora", "fedavg", "flora")
GLOBAL_FOLDER = "global"  # where `--method flora` writes its stacked adapter


def aggregate_baseline(
    method: str,
    adapters: list[Adapter],
    client_w: list[float],
    output: Path,
    overrides: list[int | None],
    compute: Compute,
    progress: ProgressHook | None = None,
) -> dict[str, Any]:
    """One baseline round over already validated adapters; api.aggregate prepares the arguments."""

    _check_method_fits(method, adapters, overrides)
    outputs: dict[str, dict] = {adapter.name: {} for adapter in adapters}
    stacked, stacked_ranks, modules = {}, {}, []
    device, dtype = compute.torch_device, compute.torch_dtype
    names = module_names(adapters)
    for index, name in enumerate(names):
        holders = [(a, w) for a, w in zip(adapters, client_w) if name in a.modules]
        factors = [tuple(t.to(device) for t in adapter.factors(name)) for adapter, _ in holders]
        if method == "flora":
            terms = [flexlora.LoraTerm(B, A, w * a.modules[name].scaling) for (B, A), (a, w) in zip(factors, holders)]
            B, A = baselines.flora(terms, dtype)
            put_factors(stacked, holders[0][0].modules[name], B, A, compute.output_dtype(widest_dtype(adapters)))
            stacked_ranks[name] = A.shape[0]
        else:
            # Over the holders only: a client without this module has no factors to average.
            shares = [w for _, w in holders]
            if method == "fedavg":
                average = baselines.fedavg(factors, shares, dtype)
                given = [average] * len(holders)
            else:
                ranks = [overrides[adapters.index(a)] or a.modules[name].rank for a, _ in holders]
                given = baselines.hetlora(factors, shares, ranks, dtype)
            for (adapter, _), (B, A) in zip(holders, given):
                put_factors(outputs[adapter.name], adapter.modules[name], B, A, compute.output_dtype(adapter.dtype))
        modules.append(
            {
                "name": name,
                "clients": [a.name for a, _ in holders],
                "missing_from": [a.name for a in adapters if name not in a.modules],
                **({"rank": stacked_ranks[name]} if method == "flora" else {}),
            }
        )
        if progress:
            progress(index + 1, len(names), name)
    extras = averaged_extras(adapters, client_w, compute.output_dtype)
    reports = client_reports(adapters, client_w)
    with atomic_folder(output) as staging:
        if method == "flora":
            write_adapter(staging / GLOBAL_FOLDER, merged_config(adapters, stacked_ranks), {**stacked, **extras})
        else:
            write_client_adapters(staging, adapters, overrides, outputs, extras)
    for report, adapter, override in zip(reports, adapters, overrides):
        if method == "flora":
            report["output"] = str(output / GLOBAL_FOLDER)
            report["output_ranks"] = sorted(set(stacked_ranks.values()))
        else:
            report["output"] = str(output / adapter.name)
            report["output_ranks"] = [override] if override else report["ranks"]
    result = {"command": "aggregate", "method": method, "output": str(output), "clients": reports, "modules": modules}
    if method == "flora":
        result["global"] = str(output / GLOBAL_FOLDER)
    return result


def _check_method_fits(method: str, adapters: Sequence[Adapter], overrides: Sequence[int | None]) -> None:
    """Refuse, before any work, what the method cannot do."""
    if method in ("fedavg", "flora") and any(o is not None for o in overrides):
        raise OptionError("--ranks", f"{method} decides the output ranks itself; --ranks applies to flexlora and hetlora")
    seen: dict[str, tuple[int, Adapter]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            first = seen.setdefault(name, (module.rank, adapter))
            if method == "fedavg" and module.rank != first[0]:
                raise IncompatibleAdaptersError(
                    adapter.source,
                    f"module {name} has rank {module.rank} here but {first[0]} in {first[1].source}; fedavg needs equal ranks",
                    hint="train every client at the same (smallest) rank, or use --method flexlora or hetlora",
                )
    if method == "hetlora":
        for adapter, override in zip(adapters, overrides):
            for name in adapter.modules if override else ():
                largest = max(a.modules[name].rank for a in adapters if name in a.modules)
                if override > largest:
                    raise OptionError(
                        "--ranks", f"rank {override} for {adapter.name} exceeds the largest client rank {largest} of module {name}; HetLoRA cannot give more"
                    )
