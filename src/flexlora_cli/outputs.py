"""What a round writes: one adapter folder per output, each a share of every module's update.

- `ClientOutput`: a client's next adapter: its own config, modules and dtype, each module at the
  client's rank (or an override) and the client's own PEFT scaling.
- `ModelOutput`: one adapter for the whole federation (merge's output, aggregate's OUT/global/, split's
  rank-<r>/ and energy-<E>/): per module a fixed rank, the rank that keeps a share of the energy, or
  the method's own global rank; scaling alpha/r with a given alpha, else the method's global scaling.

Both only decide ranks, scalings and configs; the round skeleton (flexlora_cli.round) computes and
writes. Ranks are decided per module once its update is known (an energy share needs the spectrum).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flexlora_cli import flexlora
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.methods.base import ModuleUpdate


@dataclass
class Output:
    """One adapter folder of a round: which modules it holds, and per module its rank and scaling."""

    folder: str  # relative to OUT; "" is OUT itself
    name: str  # how reports and cards call it
    modules: dict[str, LoraModule]  # module name -> its layout in this output (keys, kind, shape)
    dtype: torch.dtype
    extra_keys: list[str]  # non-LoRA tensors it gets (modules_to_save)
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    energy_kept: float = 0.0  # squared singular values kept, over its modules
    energy_total: float = 0.0
    has_spectrum: bool = False
    per_module_report: bool = False  # list its rank and energy per module in the round's report

    def decide(self, name: str, update: ModuleUpdate) -> int:
        """Fix this module's rank and scaling from its update; tally the energy kept. Returns the rank."""
        rank = self.rank_for(name, update)
        self.ranks[name] = rank
        self.scalings[name] = self.scaling_for(name, rank, update)
        spectrum = update.spectrum()
        if spectrum is not None:
            self.has_spectrum = True
            squares = spectrum.double() ** 2
            self.energy_kept += float(squares[:rank].sum())
            self.energy_total += float(squares.sum())
        return rank

    @property
    def energy(self) -> float | None:
        """Share of its modules' energy it keeps (None where the method has no spectrum)."""
        if not self.has_spectrum:
            return None
        return self.energy_kept / self.energy_total if self.energy_total else 1.0

    def rank_for(self, name: str, update: ModuleUpdate) -> int:
        raise NotImplementedError

    def fixed_rank(self, name: str) -> int | None:
        """The rank it takes from this module whatever the update (None: decided from the update)."""
        raise NotImplementedError

    def scaling_for(self, name: str, rank: int, update: ModuleUpdate) -> float:
        raise NotImplementedError

    def config(self):
        """The adapter_config of this output, once every module's rank is decided."""
        raise NotImplementedError


@dataclass
class ClientOutput(Output):
    """A client's next adapter: its own config; its rank per module, or `override` everywhere."""

    own_config: object = None  # the client's adapter config
    override: int | None = None

    @classmethod
    def of(cls, adapter: Adapter, override: int | None, dtype: torch.dtype) -> ClientOutput:
        return cls(adapter.name, adapter.name, dict(adapter.modules), dtype, list(adapter.extra_keys), own_config=adapter.config, override=override)

    def rank_for(self, name: str, update: ModuleUpdate) -> int:
        return self.fixed_rank(name)

    def fixed_rank(self, name: str) -> int:
        return self.override or self.modules[name].rank

    def scaling_for(self, name: str, rank: int, update: ModuleUpdate) -> float:
        return flexlora.lora_scaling(self.modules[name].alpha, rank, bool(self.own_config.use_rslora))

    def config(self):
        if self.override is None:
            return self.own_config
        return replace_config(self.own_config, r=self.override, rank_pattern={})


@dataclass
class ModelOutput(Output):
    """One adapter for the federation at a fixed rank, an energy share, or the method's global rank."""

    template: object = None  # the config it starts from (the first input's)
    targets: object = None  # target_modules to write
    modules_to_save: list[str] | None = None
    rank: int | None = None
    energy_share: float | None = None
    alpha: float | None = None  # lora_alpha for every module; None: alpha_m = global scaling * r_m
    alphas: dict[str, float] = field(default_factory=dict)

    def fixed_rank(self, name: str) -> int | None:
        return self.rank

    def rank_for(self, name: str, update: ModuleUpdate) -> int:
        if self.rank is not None:
            return self.rank
        if self.energy_share is not None:
            return min(flexlora.rank_for_energy(update.spectrum(), self.energy_share), update.global_rank())
        return update.global_rank()

    def scaling_for(self, name: str, rank: int, update: ModuleUpdate) -> float:
        if self.alpha is not None:
            self.alphas[name] = self.alpha
            return self.alpha / rank
        self.alphas[name] = update.global_scaling * rank
        return update.global_scaling

    def config(self):
        default_rank = _most_common(self.ranks)
        default_alpha = _most_common(self.alphas, prefer=[a for n, a in self.alphas.items() if self.ranks[n] == default_rank])
        return replace_config(
            self.template,
            r=default_rank,
            lora_alpha=default_alpha,
            rank_pattern={name: r for name, r in sorted(self.ranks.items()) if r != default_rank},
            alpha_pattern={name: a for name, a in sorted(self.alphas.items()) if a != default_alpha},
            use_rslora=False,
            target_modules=self.targets,
            layers_to_transform=None,
            layers_pattern=None,
            modules_to_save=self.modules_to_save,
        )


def model_output(
    folder: str, name: str, adapters: Sequence[Adapter], dtype: torch.dtype, *, rank: int | None = None,
    energy: float | None = None, alpha: float | None = None,
) -> ModelOutput:
    """A ModelOutput over every module and extra tensor of `adapters` (the union), configured from the first.

    `adapters` may also be any sources with an adapter's `config`, `modules` and `extra_keys` (a dense file).
    """
    modules: dict[str, LoraModule] = {}
    for adapter in adapters:
        for module_name, module in adapter.modules.items():
            modules.setdefault(module_name, module)
    extras = sorted(set().union(*(adapter.extra_keys for adapter in adapters)))
    return ModelOutput(
        folder, name, dict(sorted(modules.items())), dtype, extras, per_module_report=True, template=adapters[0].config,
        targets=_union_targets(adapters, modules), modules_to_save=_union_modules_to_save(adapters),
        rank=rank, energy_share=energy, alpha=alpha,
    )


def replace_config(config, **changes):
    """A copy of an adapter config with fields replaced."""
    if hasattr(config, "replace"):
        return config.replace(**changes)
    import copy

    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _most_common(values: dict, prefer=None):
    """The most common value (ties: the larger), among `prefer` where given."""
    pool = list(prefer) if prefer else list(values.values())
    counts = Counter(pool)
    return max(counts, key=lambda v: (counts[v], v))


def _union_targets(adapters: Sequence[Adapter], modules: dict[str, LoraModule]):
    """Keep the clients' target_modules where they all agree; else name every module explicitly."""
    targets = [adapter.config.target_modules for adapter in adapters]
    plain = all(isinstance(t, (set, frozenset, list, tuple)) and a.config.layers_to_transform is None for t, a in zip(targets, adapters))
    if plain and all(set(t) == set(targets[0]) for t in targets):
        return sorted(targets[0])
    return sorted(modules)


def _union_modules_to_save(adapters: Sequence[Adapter]) -> list[str] | None:
    names = sorted(set().union(*(adapter.config.modules_to_save or [] for adapter in adapters)))
    return names or None
