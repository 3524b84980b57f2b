"""A round's clients, checked before any work: loaded adapters, aggregation weights, output ranks,
whether the chosen method can take them, and how far the round trusts each (norms, clipping, screening)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexlora_cli import flexlora, trust
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.sources import open_adapters
from flexlora_cli.adapters.validate import check_compatible
from flexlora_cli.errors import AdapterError, IncompatibleAdaptersError, OptionError
from flexlora_cli.methods.registry import Method

AdapterSpec = str | Path | Adapter


def open_clients(specs: Sequence[AdapterSpec], allow_base_mismatch: bool = False) -> list[Adapter]:
    """Load and validate every client (local folders, Hub references, NAME=...), and check they fit together."""
    adapters = open_adapters(specs)
    check_compatible(adapters, allow_base_mismatch)
    return adapters


def client_weights(count: int, weights: Sequence[float] | None = None, num_samples: Sequence[float] | None = None) -> list[float]:
    """Normalized aggregation weights: explicit weights, else sample counts, else uniform."""
    if weights is not None and num_samples is not None:
        raise OptionError.argument("weights", "give either weights or sample counts, not both")
    option, values = ("num_samples", num_samples) if num_samples is not None else ("weights", weights)
    try:
        return flexlora.normalize_weights(values, count)
    except ValueError as error:
        raise OptionError.argument(option, str(error)) from None


def positive_ranks(ranks: Sequence[int], option: str) -> list[int]:
    """The distinct ranks asked for, sorted; OptionError unless each is a positive integer."""
    if not ranks:
        raise OptionError.argument(option, "give at least one rank")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
    if bad:
        raise OptionError.argument(option, f"each rank must be a positive integer, got {bad[0]!r}")
    return sorted(set(ranks))


def rank_overrides(ranks: Sequence[int] | None, adapters: Sequence[Adapter]) -> list[int | None]:
    """Per client: the rank it gets instead of its own (None: its own). One rank for all, or one each."""
    if not ranks:
        return [None] * len(adapters)
    positive_ranks(ranks, "ranks")
    if len(ranks) == 1:
        return [ranks[0]] * len(adapters)
    if len(ranks) != len(adapters):
        raise OptionError.argument("ranks", f"give one rank for all clients or one per client; got {len(ranks)} for {len(adapters)} clients")
    return list(ranks)


def check_rank_fits(rank: int, module: LoraModule, option: str) -> None:
    """A rank the user asks for must fit the module (a client's own trained rank need not)."""
    limit = min(module.d_out, module.d_in)
    if rank > limit:
        raise OptionError.argument(option, f"rank {rank} does not fit module {module.name} ({module.d_out}x{module.d_in}, at most {limit})")


def check_energy(energy: float | None, option: str = "energy") -> None:
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0 and math.isfinite(energy)):
        raise OptionError.argument(option, f"must be a share of the energy in (0, 1], e.g. 0.9; got {energy!r}")


def check_method_fits(method: Method, adapters: Sequence[Adapter], overrides: Sequence[int | None]) -> None:
    """Refuse, before any work, what the method cannot do with these clients (by its registry facts)."""
    if any(o is not None for o in overrides) and (method.equal_ranks or not method.per_client):
        raise OptionError.argument("ranks", f"{method.name} decides the output ranks itself; ranks apply to methods that hand each client its own rank")
    first: dict[str, tuple[LoraModule, Adapter]] = {}
    largest: dict[str, int] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            seen, owner = first.setdefault(name, (module, adapter))
            largest[name] = max(largest.get(name, 0), module.rank)
            if method.equal_ranks and module.rank != seen.rank:
                raise IncompatibleAdaptersError(
                    adapter.source,
                    f"module {name} has rank {module.rank} here but {seen.rank} in {owner.source}; {method.name} needs equal ranks",
                    hint="train every client at the same (smallest) rank, or use --method flexlora or hetlora",
                )
            if method.raw_factors and not math.isclose(module.scaling, seen.scaling, rel_tol=1e-9):
                raise IncompatibleAdaptersError(
                    adapter.source,
                    f"module {name} has PEFT scaling {module.scaling:g} here but {seen.scaling:g} in {owner.source}; "
                    f"{method.name} averages raw factors, so clients must share one scaling",
                    hint="give every client the same alpha/r (e.g. lora_alpha = 2r for all), or use --method flexlora",
                )
    if method.shares_up_to_largest:
        for adapter, override in zip(adapters, overrides):
            for name in adapter.modules if override else ():
                if override > largest[name]:
                    raise OptionError.argument(
                        "ranks", f"rank {override} for {adapter.name} exceeds the largest client rank {largest[name]} of module {name}; {method.name} cannot give more"
                    )


def client_reports(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[dict]:
    """Each client as reports and manifests list it."""
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


# --- trust: norms, clipping, screening -----------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How a round treats each client: its update norm, its clip factor, and whether it is left out."""

    norms: list[float]
    clip: float | None  # the clipping norm C, None: no clipping
    clip_factors: list[float]  # min(1, C / norm); 1.0 without clipping
    screening: trust.Screening | None  # None: not screened
    left_out: list[int]  # indices of the clients screened out of the round


def update_norms(adapters: Sequence[Adapter], gram_dtype: torch.dtype = torch.float32, device=None) -> list[float]:
    """Each client's ||dW_i||_F over all its modules, with its PEFT scalings, reading every factor once."""

    def modules(adapter: Adapter):
        for name, module in adapter.modules.items():
            B, A = adapter.factors(name)
            yield B.to(device), A.to(device), module.scaling

    return [trust.client_norm(modules(adapter), gram_dtype) for adapter in adapters]


def assess(
    adapters: Sequence[Adapter], *, clip: float | None = None, screen: str | None = None,
    threshold: float = trust.SCREEN_THRESHOLD, gram_dtype: torch.dtype = torch.float32, device=None,
) -> Verdict:
    """Norms, clip factors and screening of a round's clients (`screen`: None, "drop" or "refuse").

    "refuse" raises AdapterError naming the first flagged client; "drop" leaves the flagged out.
    """
    norms = update_norms(adapters, gram_dtype, device)
    factors = trust.clip_factors(norms, clip) if clip is not None else [1.0] * len(norms)
    screening, left_out = None, []
    if screen is not None:
        ranks = [sum(m.rank for m in a.modules.values()) / len(a.modules) for a in adapters]
        try:
            screening = trust.screen(norms, ranks, threshold)
        except ValueError as error:
            raise OptionError.argument("screen", str(error)) from None
        left_out = screening.flagged
        if left_out and screen == "refuse":
            first = left_out[0]
            more = f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else ""
            raise AdapterError(
                adapters[first].source, f"{screen_reason(screening, first)}{more}; the round was refused (--screen-refuse)",
                hint="check this client's upload, or pass --screen to leave it out of the round instead",
            )
        _check_left_out_covered(adapters, left_out)
    return Verdict(norms, clip, factors, screening, left_out)


def screen_reason(screening: trust.Screening, index: int) -> str:
    """Why a client was flagged, in words."""
    ratio = screening.ratio(index)
    shown = f"{ratio:.0f}" if ratio >= 100 else f"{ratio:.3g}"
    return (
        f"its update norm per unit of rank is {shown}x the median client's "
        f"(robust z {screening.scores[index]:.1f} > {screening.threshold:g})"
    )


def round_weights(shares: Sequence[float], left_out: Sequence[int]) -> list[float]:
    """Each client's weight in the round: 0 for those left out, the others' renormalized among them."""
    total = math.fsum(w for i, w in enumerate(shares) if i not in left_out)
    if not left_out or total == 0:  # nothing to renormalize (or only zero weights left: keep them as given)
        return [0.0 if i in left_out else w for i, w in enumerate(shares)]
    return [0.0 if i in left_out else w / total for i, w in enumerate(shares)]


def trust_reports(verdict: Verdict) -> list[dict]:
    """Per client, what reports and (outside DP) manifests and cards show about its trust."""
    return [
        {
            "update_norm": norm,
            "clip_factor": factor if verdict.clip is not None else None,
            "clipped": verdict.clip is not None and factor < 1.0,
            "screened": index in verdict.left_out,
            "screen_score": verdict.screening.scores[index] if verdict.screening is not None else None,
        }
        for index, (norm, factor) in enumerate(zip(verdict.norms, verdict.clip_factors))
    ]


def _check_left_out_covered(adapters: Sequence[Adapter], left_out: Sequence[int]) -> None:
    """A screened-out client still gets the round's result, so the others must cover its modules and tensors."""
    kept = [a for i, a in enumerate(adapters) if i not in left_out]
    if not kept:
        raise OptionError.argument("screen", "every client was flagged; nothing is left to aggregate")
    modules = set().union(*(a.modules for a in kept))
    extras = set().union(*(a.extra_keys for a in kept))
    for index in left_out:
        missing = sorted(set(adapters[index].modules) - modules) or sorted(set(adapters[index].extra_keys) - extras)
        if missing:
            raise AdapterError(
                adapters[index].source, f"{missing[0]} is held by no other client, and this client was screened out of the round "
                "(nothing would be left to send it there)", hint="pass --screen-refuse to refuse the round instead",
            )
