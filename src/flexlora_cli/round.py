"""The one round skeleton: every verb that writes adapters (merge, split, aggregate, the Flower
strategy) runs its modules through here.

1. Compute: stream the modules one at a time. For each, read only that module's client factors
   (lazily, one client at a time), run the method (flexlora_cli.methods) to get its update, let
   every output decide its rank there (outputs.py), and keep the update at the largest rank any
   output takes in an UpdateStore (memory up to a budget, the rest spilled to the staging folder).
2. Write: build one output at a time from the stored updates (its share of every module, in its
   dtype, checked finite) and write it as a PEFT adapter folder; never all outputs at once.

The verbs (api.py) decide what goes in and what comes out; this file never branches on a method's
name: what a method needs is in its registry entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexlora_cli import flexlora, svd_paths, trust
from flexlora_cli.adapters.dense import dense_dtype, read_dense_delta, read_dense_layout
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.tensors import all_finite
from flexlora_cli.compute import Compute
from flexlora_cli.errors import OutputError
from flexlora_cli.methods.base import MathSettings, ModuleClients, ModuleUpdate, SvdUpdate
from flexlora_cli.methods.registry import Method
from flexlora_cli.outputs import Output
from flexlora_cli.store import UpdateStore

# (modules done, modules in all, current module) -> None; the CLI draws a progress bar with it.
ProgressHook = Callable[[int, int, str], None]

# Modules on which a randomized SVD is also run exactly, to report the error it cost.
RANDOMIZED_CHECKS = 3


def each_module(names: Sequence[str], progress: ProgressHook | None) -> Iterator[tuple[int, str]]:
    """(index, name) over `names`, reporting progress after each: the one module loop of every verb."""
    for index, name in enumerate(names):
        yield index, name
        if progress:
            progress(index + 1, len(names), name)


class ClientUpdates:
    """Module updates from client adapters through an aggregation method.

    `weights` are the clients' normalized aggregation weights; `clip` optionally scales each client's
    whole update (its B in every module) before weighting. With `norms` (a dtype for the Gram matrices),
    each client's update norm ||dW_i||_F (trust.update_norm_squared) is summed as its factors are first read in each
    module, so that a round that decides nothing by the norms still reports them without a second pass.
    """

    def __init__(self, adapters: Sequence[Adapter], weights: Sequence[float], method: Method, options: dict | None = None,
                 clip: Sequence[float] | None = None, norms: torch.dtype | None = None):
        self.adapters, self.weights, self.method = list(adapters), list(weights), method
        self.options = dict(options or {})
        self.clip = list(clip) if clip is not None else [1.0] * len(self.adapters)
        self.gram_dtype = norms
        self.squares: list[float] | None = [0.0] * len(self.adapters) if norms is not None else None
        self._seen: set[tuple[int, str]] = set()
        self.holders: dict[str, list[int]] = {}
        for index, adapter in enumerate(self.adapters):
            for name in adapter.modules:
                self.holders.setdefault(name, []).append(index)
        self.holders = dict(sorted(self.holders.items()))
        self.modules: dict[str, LoraModule] = {name: self.adapters[held[0]].modules[name] for name, held in self.holders.items()}

    def clients(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> ModuleClients:
        held = self.holders[name]
        modules = [self.adapters[i].modules[name] for i in held]
        total = sum(self.weights[i] for i in held)
        weights = tuple(self.weights[i] / total if total else 1.0 / len(held) for i in held)
        spec = self.modules[name]

        def read(k: int):
            index = held[k]
            B, A = self.adapters[index].factors(name)
            B, A = B.to(device), A.to(device)
            if self.squares is not None and (index, name) not in self._seen:
                self._seen.add((index, name))
                self.squares[index] += modules[k].scaling**2 * trust.update_norm_squared(B, A, self.gram_dtype)
            if self.clip[index] == 1.0:
                return B, A
            # scaled in the compute dtype: in the file's (bf16, say) the clipped factor would be rounded again
            return B.to(dtype or torch.promote_types(B.dtype, torch.float32)) * self.clip[index], A

        return ModuleClients(
            (spec.d_out, spec.d_in), tuple(m.rank for m in modules), tuple(m.scaling for m in modules), weights, read, total_weight=total
        )

    @property
    def norms(self) -> list[float] | None:
        """Each client's ||dW_i||_F over its modules, once every module was computed (with `norms`)."""
        return None if self.squares is None else [math.sqrt(square) for square in self.squares]

    def update(self, name: str, settings: MathSettings) -> ModuleUpdate:
        return self.method.aggregate(self.clients(name, settings.device, settings.dtype), settings)

    def describe(self, name: str) -> dict[str, Any]:
        held = set(self.holders[name])
        return {
            "clients": [self.adapters[i].name for i in sorted(held)],
            "missing_from": [a.name for i, a in enumerate(self.adapters) if i not in held],
        }

    def extras(self, dtype_for: Callable[[torch.dtype], torch.dtype]) -> dict[str, torch.Tensor]:
        """Weighted average of the non-LoRA tensors (modules_to_save, ...) over the clients that have them."""
        from flexlora_cli.errors import IncompatibleAdaptersError

        result = {}
        for key in sorted(set().union(*(adapter.extra_keys for adapter in self.adapters))):
            holders = [(a, w) for a, w in zip(self.adapters, self.weights) if key in a.extra_keys]
            total = sum(w for _, w in holders) or 1.0
            tensors = [(a.tensor(key), w) for a, w in holders]
            shapes = {tuple(t.shape) for t, _ in tensors}
            if len(shapes) > 1:
                raise IncompatibleAdaptersError(holders[0][0].source, f"tensor {key} has different shapes across clients: {sorted(shapes)}")
            average = sum(t.double() * (w / total) for t, w in tensors)
            result[key] = average.to(dtype_for(tensors[0][0].dtype))
        return result


class DenseUpdates:
    """Module updates read from a `merge --dense` file: each module's stored full-size update, as its SVD."""

    def __init__(self, path: Path):
        self.path = path
        self.config, self.layout = read_dense_layout(path)
        self.modules = {
            name: LoraModule(name, info["kind"], 1, 1.0, 1.0, info["shape"][0], info["shape"][1]) for name, info in self.layout.items()
        }
        self.modules = dict(sorted(self.modules.items()))
        self.extra_keys: list[str] = []
        self.dtype = dense_dtype(path)

    def update(self, name: str, settings: MathSettings) -> ModuleUpdate:
        delta = read_dense_delta(self.path, name, self.layout[name])
        return SvdUpdate(flexlora.dense_svd(delta.to(settings.device, settings.dtype)), {"path": "dense"})

    def describe(self, name: str) -> dict[str, Any]:
        return {}

    def extras(self, dtype_for) -> dict[str, torch.Tensor]:
        return {}


Updates = ClientUpdates | DenseUpdates


@dataclass
class RoundResult:
    """What the compute phase produced: the stored updates, per-module reports, and the extras."""

    store: UpdateStore
    modules: list[dict[str, Any]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    pushed: list[dict] | None = None  # the commits, when the outputs were pushed to the Hub

    @property
    def randomized_error(self) -> float | None:
        errors = [m["randomized_error"] for m in self.modules if m.get("randomized_error") is not None]
        return max(errors) if errors else None


def compute(
    updates: Updates,
    outputs: Sequence[Output],
    compute: Compute,
    *,
    store: UpdateStore,
    options: dict | None = None,
    keep_exact: bool = False,
    keep_rank: int = 0,
    progress: ProgressHook | None = None,
    noise: Callable[[str], Any] | None = None,
) -> RoundResult:
    """Phase 1: every module's update, each output's rank there, and the update kept at the largest rank.

    `keep_exact` keeps every update at its full numerical rank as well (for a dense file of the exact
    update); `keep_rank` at least that rank (for shares asked for later, as the Flower strategy does).
    `noise` gives each module's DP noise (module name -> flexlora_cli.privacy.NoiseFn), for the method.
    """
    names = list(updates.modules)
    holders = {name: [output for output in outputs if name in output.modules] for name in names}
    checked = _sampled(len(names), RANDOMIZED_CHECKS)
    rates = svd_paths.CUDA_RATES if compute.torch_device.type == "cuda" else svd_paths.CPU_RATES
    reports = []
    for index, name in each_module(names, progress):
        top_k = _top_k(name, holders[name], compute)
        settings = MathSettings(
            dtype=compute.torch_dtype, device=compute.torch_device, svd=compute.svd.value, path=compute.path.value,
            top_k=top_k, check_randomized=index in checked, rates=rates, options=dict(options or {}),
            noise=noise(name) if noise is not None else None,
        )
        update = updates.update(name, settings)
        ranks = [output.decide(name, update) for output in holders[name]]
        keep = max(*ranks, keep_rank, 1)
        if keep_exact:
            keep = max(keep, update.global_rank())
        report = _module_report(name, update, updates.describe(name))
        shown = [output for output in holders[name] if output.per_module_report]
        if shown:
            spectrum = update.spectrum()
            report["ranks"] = {output.folder: output.ranks[name] for output in shown}
            if spectrum is not None:
                report["energy_kept"] = {output.folder: flexlora.energy_kept(spectrum, output.ranks[name]) for output in shown}
        reports.append(report)
        store.put(name, update.keep(keep))
    return RoundResult(store, reports, updates.extras(compute.output_dtype))


def output_tensors(result: RoundResult, output: Output, balanced: bool) -> dict[str, torch.Tensor]:
    """Phase 2, one output: its share of every module it holds, in its dtype, plus its extra tensors.

    Raises OutputError naming the module where the output dtype cannot hold the factors.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, module in output.modules.items():
        update = result.store.get(name)
        B, A = update.client_share(output.ranks[name], output.scalings[name], balanced)
        for key, factor in ((module.b_key, B), (module.a_key, A)):
            written = factor.to(dtype=output.dtype, device="cpu").contiguous()
            if not all_finite(written):
                raise OutputError(
                    output.folder or output.name,
                    f"module {name}: its factors overflow {str(output.dtype).removeprefix('torch.')}",
                    hint="pass --balanced (sqrt(S) on both factors) or a wider --dtype",
                )
            tensors[key] = written
    for key in output.extra_keys:
        tensors[key] = result.extras[key].to(output.dtype if result.extras[key].is_floating_point() else result.extras[key].dtype)
    return tensors


def dense_deltas(result: RoundResult, modules: dict[str, LoraModule], dtype: torch.dtype) -> dict[str, tuple[str, torch.Tensor]]:
    """Each module's exact update as a d_out x d_in tensor (the stored SVD at its numerical rank)."""
    deltas = {}
    for name, module in modules.items():
        update = result.store.get(name)
        B, A = update.client_share(update.global_rank(), 1.0)
        deltas[name] = (module.kind, (B.double() @ A.double()).to(dtype))
    return deltas


def _top_k(name: str, outputs: Iterable[Output], compute: Compute) -> int | None:
    """The largest rank any output will take from this module, for a randomized SVD (None: exact needed)."""
    wanted = [output.fixed_rank(name) for output in outputs]
    return None if None in wanted or not wanted else max(wanted)


def _sampled(count: int, samples: int) -> set[int]:
    return {round(i * (count - 1) / max(samples - 1, 1)) for i in range(samples)} if count else set()


def _module_report(name: str, update: ModuleUpdate, described: dict[str, Any]) -> dict[str, Any]:
    report = {"name": name, **described, **{k: v for k, v in update.info.items()}}
    if isinstance(update, SvdUpdate):
        report["numerical_rank"] = update.global_rank()
    report.setdefault("path", None)
    report.setdefault("randomized_error", None)
    return report
