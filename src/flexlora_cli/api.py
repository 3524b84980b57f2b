"""The library's verbs: merge, split, aggregate, inspect (and fold, in fold.py). The CLI calls exactly these.

Each verb checks all inputs and the output location first, then runs the round skeleton (round.py):
modules streamed one at a time through a method, outputs written one at a time into a hidden staging
folder, moved into place with a manifest only when complete (adapters/output.py). Each returns a
JSON-ready report (a dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flexlora_cli import round as round_
from flexlora_cli.adapters import card
from flexlora_cli.adapters.dense import DENSE_FILE_NAME
from flexlora_cli.adapters.model import Adapter
from flexlora_cli.adapters.names import GLOBAL_FOLDER, check_client_names
from flexlora_cli.adapters.sources import open_adapter, open_adapters
from flexlora_cli.choices import MethodName, SvdMode, value
from flexlora_cli.clients import (
    AdapterSpec,
    Verdict,
    assess,
    check_energy,
    check_method_fits,
    check_rank_fits,
    client_reports,
    client_weights,
    open_clients,
    positive_ranks,
    rank_overrides,
    round_weights,
    trust_reports,
)
from flexlora_cli import trust
from flexlora_cli.compute import Compute, widest_dtype
from flexlora_cli.errors import AdapterError, OptionError
from flexlora_cli.methods import registry
from flexlora_cli.outputs import ClientOutput, Output, model_output
from flexlora_cli.privacy import Privacy
from flexlora_cli.release import Push, check_push, manifest_inputs, pushed_report, run_round
from flexlora_cli.safeguards import card_trust, check_trust, private_round, screen_settings, trust_notes
from flexlora_cli.round import ClientUpdates, DenseUpdates, ProgressHook, each_module

SINGLE_INPUT_NOTE = "merging a single adapter: output equals its delta"  # allowed, but likely a slip

def merge(
    adapters: Sequence[AdapterSpec],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    num_samples: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    dense: bool = False,
    compute: Compute = Compute(),
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    progress: ProgressHook | None = None,
    push: Push | None = None,
) -> dict[str, Any]:
    """Merge client adapters into one LoRA adapter whose delta is the weighted sum of theirs (FlexLoRA's
    global update). Each module gets the numerical rank of its merged update (exact), `rank`
    (truncated), or the smallest rank keeping the share `energy` of its squared Frobenius norm.
    """
    check_push("merge", push)
    clients = open_clients(adapters, allow_base_mismatch)
    shares = client_weights(len(clients), weights, num_samples)
    if rank is not None and energy is not None:
        raise OptionError.argument("energy", "give either rank or energy, not both")
    check_energy(energy)
    if rank is not None:
        positive_ranks([rank], "rank")
        for adapter in clients:
            for module in adapter.modules.values():
                check_rank_fits(rank, module, "rank")
    if compute.svd is SvdMode.randomized and rank is None:
        raise OptionError.argument("svd", "randomized needs the rank to keep (rank); the exact SVD does not")
    if dense and compute.svd is SvdMode.randomized:
        raise OptionError.argument("dense", "writes the exact full-size update; it cannot come from a randomized SVD")
    output = Path(output)
    merged = model_output("", output.name, clients, compute.output_dtype(widest_dtype(a.dtype for a in clients)), rank=rank, energy=energy)
    inputs = card.describe_inputs(clients, shares)
    updates = ClientUpdates(clients, shares, registry.get("flexlora"))

    def cards(outputs: Sequence[Output]) -> dict[str, str]:
        return {"": card.model_card("merge", output.name, inputs, base_model=clients[0].base_model,
                                    rank=card.rank_summary(merged.ranks.values()), energy_kept=merged.energy)}

    result = run_round(
        "merge", output, clients, updates, [merged], compute, cards=cards, overwrite=overwrite, progress=progress,
        push=push, manifest={"inputs": manifest_inputs(inputs), "method": "flexlora", "rank": rank, "energy": energy, "dense": dense},
        dense=dense,
    )
    return {
        "command": "merge",
        "output": str(output),
        "dense_file": str(output / DENSE_FILE_NAME) if dense else None,
        "clients": client_reports(clients, shares),
        "modules": [{**m, "rank": m["ranks"][""], "energy_kept": m["energy_kept"][""]} for m in result.modules],
        "energy_kept": merged.energy,
        **_svd_summary(compute, result),
        **pushed_report(result),
        "notes": [SINGLE_INPUT_NOTE] if len(clients) == 1 else [],
    }


def split(
    merged: AdapterSpec,
    ranks: Sequence[int] = (),
    output: str | Path = "",
    *,
    energy: Sequence[float] = (),
    alpha: float | None = None,
    compute: Compute = Compute(),
    overwrite: bool = False,
    progress: ProgressHook | None = None,
    push: Push | None = None,
) -> dict[str, Any]:
    """Best rank-r approximations of an adapter's delta (or a --dense file's): OUT/rank-<r>/ for each r
    in `ranks`, and OUT/energy-<E>/ for each share E in `energy` (per-module ranks keeping that share
    of each module's squared Frobenius norm). Scaling alpha/r (alpha defaults to r: scaling 1).
    """
    check_push("split", push)
    ranks = positive_ranks(ranks, "ranks") if ranks else []
    shares = sorted(set(energy))
    for share in shares:
        check_energy(share)
    if not ranks and not shares:
        raise OptionError.argument("ranks", "give at least one rank (or an energy share)")
    if alpha is not None and not alpha > 0:
        raise OptionError.argument("alpha", f"must be positive, got {alpha}")
    output = Path(output)
    source, updates, inputs = _split_source(merged)
    for module in updates.modules.values():
        for r in ranks:
            check_rank_fits(r, module, "ranks")
    dtype = compute.output_dtype(source.dtype)
    outputs = [
        *(model_output(f"rank-{r}", f"rank {r}", [source], dtype, rank=r, alpha=alpha if alpha is not None else r) for r in ranks),
        *(model_output(f"energy-{e:g}", f"energy {e:g}", [source], dtype, energy=e, alpha=alpha) for e in shares),
    ]

    def cards(outputs: Sequence[Output]) -> dict[str, str]:
        return {
            o.folder: card.model_card("split", o.name, inputs, base_model=source.config.base_model_name_or_path,
                                      rank=card.rank_summary(o.ranks.values()), energy_kept=o.energy)
            for o in outputs
        }

    result = run_round(
        "split", output, [source if isinstance(source, Adapter) else source.path], updates, outputs, compute, cards=cards, overwrite=overwrite, progress=progress,
        push=push, manifest={"inputs": manifest_inputs(inputs), "ranks": ranks, "energy": shares, "alpha": alpha},
    )
    return {
        "command": "split",
        "source": str(merged),
        "output": str(output),
        "adapters": {o.folder.removeprefix("rank-").removeprefix("energy-"): str(output / o.folder) for o in outputs},
        "modules": [
            {"name": m["name"], "numerical_rank": m.get("numerical_rank"),
             "energy_kept": {o.folder.split("-", 1)[1]: m["energy_kept"][o.folder] for o in outputs},
             **({"ranks": {o.folder.split("-", 1)[1]: m["ranks"][o.folder] for o in outputs if o.rank is None}} if shares else {})}
            for m in result.modules
        ],
        "energy_kept": {o.folder.split("-", 1)[1]: o.energy for o in outputs},
        **pushed_report(result),
    }


def aggregate(
    clients: Sequence[AdapterSpec],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    num_samples: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    method: MethodName | str = registry.DEFAULT_METHOD,
    global_: bool = False,
    global_energy: float | None = None,
    method_options: dict[str, float] | None = None,
    compute: Compute = Compute(),
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    progress: ProgressHook | None = None,
    push: Push | None = None,
    clip: float | None = None,
    screen: str | None = None,
    screen_threshold: float | None = None,
    privacy: Privacy | None = None,
) -> dict[str, Any]:
    """One server round: OUT/<client>/ per client at its own rank(s) and config, by `method`
    (flexlora_cli.methods.registry), and with `global_` (or for methods without per-client outputs)
    OUT/global/: the method's global result (`global_energy`: keep that share of each module's energy).

    `ranks` overrides the clients' ranks: one value for all, or one per client in order.

    Trust (flexlora_cli.trust; every client's update norm is reported): `clip` scales each client's
    whole update to norm at most C; `screen` ("drop" or "refuse") applies the per-rank log-MAD rule at
    `screen_threshold` and leaves flagged clients out of the round (they still get its result) or refuses
    the round. `privacy` (needs `clip`; flexlora_cli.privacy.Privacy) adds Gaussian noise to every
    module's merged update and reports (epsilon, delta) over the rounds of its ledger.
    """
    try:
        chosen = registry.get(value(method))
    except ValueError as error:
        raise OptionError.argument("method", str(error)) from None
    check_trust(chosen, clip, screen, screen_threshold, privacy, num_samples, compute, push)
    check_push("aggregate", push)
    adapters = open_clients(clients, allow_base_mismatch)
    check_client_names((a.name, a.source) for a in adapters)  # they become folders of OUT
    shares = client_weights(len(adapters), weights, num_samples)
    overrides = rank_overrides(ranks, adapters)
    for adapter, override in zip(adapters, overrides):
        for module in adapter.modules.values() if override is not None else ():
            check_rank_fits(override, module, "ranks")
    check_method_fits(chosen, adapters, overrides)
    check_energy(global_energy, "global_energy")
    if global_energy is not None and not chosen.spectral:
        raise OptionError.argument("global_energy", f"{chosen.name}'s global result has no spectrum to keep a share of; energy applies to flexlora and raflora")
    if not chosen.svd_options and (compute.svd is not SvdMode.exact or compute.path.value != "auto"):
        raise OptionError.argument("svd", f"svd and svd_path choose how flexlora computes its SVD; {chosen.name} does not use them")
    write_global = global_ or global_energy is not None or not chosen.per_client
    if write_global and compute.svd is SvdMode.randomized:
        raise OptionError.argument("svd", "randomized computes only the clients' top components; the global output needs the exact update")
    output = Path(output)
    private = private_round(privacy, clip, adapters, shares, weights, output) if privacy is not None else None
    # Norms decide clipping, screening and DP, so those need them before the first module; otherwise
    # they are summed as the round reads each factor (no second pass over the inputs).
    decides = clip is not None or screen is not None or privacy is not None
    gram_dtype = torch.float64 if privacy is not None or compute.precision.value == "fp64" else torch.float32
    verdict = assess(
        adapters, clip=clip, screen=screen, threshold=screen_threshold or trust.SCREEN_THRESHOLD, device=compute.torch_device,
        gram_dtype=gram_dtype,
    ) if decides else None
    left_out = verdict.left_out if verdict else []
    kept = [a for i, a in enumerate(adapters) if i not in left_out]
    used_by_client = round_weights(shares, left_out)  # 0 for a client screened out
    used = [w for i, w in enumerate(used_by_client) if i not in left_out]
    outputs: list[Output] = []
    if chosen.per_client:  # a screened-out client still receives the round's result
        outputs += [ClientOutput.of(a, o, compute.output_dtype(a.dtype)) for a, o in zip(adapters, overrides)]
    if write_global:
        dtype = compute.output_dtype(widest_dtype(a.dtype for a in kept))
        outputs.append(model_output(GLOBAL_FOLDER, GLOBAL_FOLDER, kept, dtype, energy=global_energy))
    clip_kept = [f for i, f in enumerate(verdict.clip_factors) if i not in left_out] if clip is not None else None
    updates = ClientUpdates(kept, used, chosen, method_options, clip=clip_kept, norms=None if decides else gram_dtype)
    done = {}  # after the round: its verdict and the inputs as cards and the manifest list them

    def finished() -> tuple[Verdict, list]:
        if not done:
            final = verdict or Verdict(updates.norms, None, [1.0] * len(adapters), None, [])
            done["verdict"] = final
            done["inputs"] = [] if private else card.describe_inputs(adapters, used_by_client, trust_reports(final))
        return done["verdict"], done["inputs"]

    def cards(outputs: Sequence[Output]) -> dict[str, str]:
        final, inputs = finished()
        return {
            o.folder: card.model_card("aggregate", o.name, inputs, base_model=adapters[0].base_model,
                                      rank=card.rank_summary(o.ranks.values()), energy_kept=o.energy, method=chosen,
                                      trust=card_trust(clip, screen, screen_threshold, final, private))
            for o in outputs
        }

    def manifest() -> dict[str, Any]:
        facts = {"method": chosen.name, "ranks": list(ranks or []) or None, "global": write_global, "global_energy": global_energy,
                 "method_options": method_options or {}}
        if private is not None:  # public facts only: no clients, norms or clip factors
            return {**facts, "privacy": private.report}
        return {**facts, "inputs": manifest_inputs(finished()[1]), "clip": clip, "screened": [adapters[i].name for i in left_out],
                "screen": screen_settings(screen, screen_threshold)}

    result = run_round(
        "aggregate", output, adapters, updates, outputs, compute, cards=cards, overwrite=overwrite, progress=progress,
        push=push, options=method_options, manifest=manifest, ledger=private.ledger if private else None,
        noise=private.noise if private else None,
    )
    by_name = {o.name: o for o in outputs if isinstance(o, ClientOutput)}
    reports = client_reports(adapters, used_by_client)
    for report, trusted in zip(reports, trust_reports(finished()[0])):
        own = by_name.get(report["name"])
        report["output"] = str(output / (own.folder if own else GLOBAL_FOLDER))
        report["output_ranks"] = sorted(set((own or outputs[-1]).ranks.values()))
        report["energy_kept"] = own.energy if own else None
        report.update(trusted)
    return {
        "command": "aggregate",
        "method": chosen.name,
        "output": str(output),
        "clients": reports,
        "modules": result.modules,
        **({"global": str(output / GLOBAL_FOLDER), "global_ranks": dict(outputs[-1].ranks), "global_energy_kept": outputs[-1].energy}
           if write_global else {}),
        **_svd_summary(compute, result),
        **pushed_report(result),
        "clip": clip,
        "screen": screen_settings(screen, screen_threshold),
        "screened": [adapters[i].name for i in left_out],
        "privacy": private.report if private else None,
        "notes": trust_notes(adapters, finished()[0], privacy, private),
    }


def inspect(
    adapters: Sequence[AdapterSpec],
    spectrum: Sequence[int] | None = None,
    progress: ProgressHook | None = None,
    *,
    values: bool = False,
) -> list[dict[str, Any]]:
    """Describe adapters; with `spectrum`, the share of each module's energy kept at those ranks; with
    `values`, also every module's singular values (what `inspect --plot` draws)."""
    ranks = positive_ranks(spectrum, "spectrum") if spectrum else []
    reports = []
    for adapter in open_adapters(adapters):
        modules = adapter.modules.values()
        target_modules = adapter.config.target_modules
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
            "target_modules": sorted(target_modules) if isinstance(target_modules, (set, frozenset, list, tuple)) else target_modules,
            "modules": len(adapter.modules),
            "modules_to_save": list(adapter.config.modules_to_save or []),
            "dtype": str(adapter.dtype).removeprefix("torch."),
            "parameters": adapter.parameter_count,
            "file": str(adapter.weights_path),
            "file_size": adapter.file_size,
        }
        if ranks or values:
            report["spectrum"] = _spectrum(adapter, ranks, progress, values)
        reports.append(report)
    return reports


# --- the shared run ------------------------------------------------------------------------------


def _svd_summary(compute: Compute, result: round_.RoundResult) -> dict[str, Any]:
    """The SVD mode, and the worst error a randomized SVD was measured to cost (on sampled modules)."""
    return {"svd": compute.svd.value, "randomized_error": result.randomized_error}


def _spectrum(adapter: Adapter, ranks: list[int], progress: ProgressHook | None, values: bool = False) -> dict[str, Any]:
    """Energy of each module's own delta kept at each rank, in fp64 (and its singular values)."""
    from flexlora_cli import flexlora

    modules, kept, total, singular = {}, dict.fromkeys(ranks, 0.0), 0.0, {}
    names = sorted(adapter.modules)
    for _, name in each_module(names, progress):
        B, A = adapter.factors(name)
        S = flexlora.factored_svd(B.double() * adapter.modules[name].scaling, A.double()).S
        squares = S ** 2
        modules[name] = {str(r): flexlora.energy_kept(S, r) for r in ranks}
        if values:
            singular[name] = S.tolist()
        total += float(squares.sum())
        for r in ranks:
            kept[r] += float(squares[:r].sum())
    report = {"overall": {str(r): kept[r] / total if total else 1.0 for r in ranks}, "modules": modules}
    return {**report, "values": singular} if values else report


def _split_source(spec: AdapterSpec):
    """(source, updates, card inputs) of what split reads: an adapter, or a `merge --dense` file."""
    if not isinstance(spec, Adapter):
        path = Path(str(spec))
        if path.is_file():
            if path.suffix != ".safetensors":
                raise AdapterError(spec, "expected an adapter folder or a flexlora --dense .safetensors file")
            updates = DenseUpdates(path)
            return updates, updates, [card.describe_file(path)]
    adapter = open_adapter(spec)
    return adapter, ClientUpdates([adapter], [1.0], registry.get("flexlora")), card.describe_inputs([adapter])


