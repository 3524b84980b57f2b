"""What an aggregation method sees and returns, for one module at a time. Pure tensors.

The round skeleton (flexlora_cli.round) hands a method one module's clients as `ModuleClients`
(read lazily, one client at a time, on the compute device) and gets back a `ModuleUpdate`: the
method's global result for that module, which also knows how to give each client its share.

Two kinds of result cover every method:

- `SvdUpdate`: the global update as its SVD (FlexLoRA, RaFLoRA). A client's share is the best
  rank-r approximation at the client's own PEFT scaling; the global adapter is the update at its
  numerical rank (or a chosen rank / energy), with scaling 1.
- Every output is a share: a client's at its rank and scaling, the global adapter's at its rank and
  `global_scaling`.
- `FactorUpdate`: global LoRA factors (B, A) meant with one PEFT scaling (HetLoRA, FedAvg,
  LoRA-FAIR: the padded averages at the largest rank; FLoRA: the stacked adapter, scaling 1).
  A client's share is the first r columns of B and rows of A, raw: PEFT applies the client's own
  scaling, which is why these methods need clients that share one scaling.

No files, no network. Bad arguments raise ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flexlora_cli import flexlora
from flexlora_cli.flexlora import LoraTerm, LowRank

Factors = tuple[Tensor, Tensor]  # (B, A): B is d_out x r, A is r x d_in


@dataclass(frozen=True)
class MathSettings:
    """How a method computes: precision, device, and the SVD choices of flexlora_cli.svd_paths."""

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    svd: str = "exact"  # or "randomized" (only the top `top_k` components)
    path: str = "auto"  # svd_paths.PATH_CHOICES
    top_k: int | None = None  # the largest rank any output takes from this module
    check_randomized: bool = False  # also run the exact SVD here and report the randomized error
    rates: Any = None  # svd_paths.Rates for the device; None: the CPU rates
    options: Mapping[str, float] = field(default_factory=dict)  # method-specific, e.g. lora-fair's "ridge"
    # DP noise for this module's full-size update (flexlora_cli.privacy.NoiseFn: (shape, dtype, device) ->
    # tensor); only methods whose registry entry is `linear` and `spectral` are given one.
    noise: Callable[[tuple[int, int], torch.dtype, torch.device], Tensor] | None = None


@dataclass(frozen=True)
class ModuleClients:
    """One module's clients, as a method sees them; factors are read lazily, one client at a time.

    `weights` are the aggregation weights normalized over the clients that hold this module, and
    `total_weight` those clients' share of every client's weight: methods that average factors average
    over the holders; methods that sum updates (`terms`) scale by it, so that a client without the
    module contributes a zero update there. `scalings` are the PEFT scalings (alpha/r, or alpha/sqrt(r)).
    """

    shape: tuple[int, int]  # (d_out, d_in)
    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    weights: tuple[float, ...]
    read: Callable[[int], Factors]  # client index -> (B, A), on the compute device
    total_weight: float = 1.0

    def __post_init__(self):
        count = len(self.ranks)
        if count == 0:
            raise ValueError("need at least one client")
        if not len(self.scalings) == len(self.weights) == count:
            raise ValueError(f"got {count} ranks, {len(self.scalings)} scalings and {len(self.weights)} weights")

    def __len__(self) -> int:
        return len(self.ranks)

    def factors(self) -> Iterator[Factors]:
        """Each client's (B, A), one at a time (a fresh pass per call)."""
        for index in range(len(self)):
            yield self.read(index)

    def terms(self) -> Iterator[LoraTerm]:
        """Each client's weighted, scaled update w_i s_i B_i A_i as a LoraTerm (a fresh pass per call), w_i
        its share of every client's weight."""
        for index, (B, A) in enumerate(self.factors()):
            yield LoraTerm(B, A, self.weights[index] * self.total_weight * self.scalings[index])


class ModuleUpdate:
    """A method's result for one module. Subclasses: SvdUpdate, FactorUpdate."""

    info: dict  # facts for the report (SVD path, randomized error, the method's per-client weights, ...)

    @property
    def rank(self) -> int:
        """Components (SvdUpdate) or columns (FactorUpdate) held."""
        raise NotImplementedError

    @property
    def global_scaling(self) -> float:
        """The PEFT scaling the global adapter's factors are meant with: its share at rank r is
        client_share(r, global_scaling)."""
        raise NotImplementedError

    def client_share(self, rank: int, scaling: float, balanced: bool = False) -> Factors:
        """LoRA factors for a client at `rank` whose PEFT scaling is `scaling`."""
        raise NotImplementedError

    def global_rank(self) -> int:
        """The rank of the method's own global adapter (FlexLoRA: the update's numerical rank)."""
        raise NotImplementedError

    def spectrum(self) -> Tensor | None:
        """Singular values of the global update, for energy shares; None where the method has none."""
        return None

    def keep(self, rank: int) -> ModuleUpdate:
        """The same update holding only what shares and global adapters up to `rank` need."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Its tensors, to spill to disk; `from_tensors` rebuilds it."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], info: dict) -> ModuleUpdate:
        raise NotImplementedError


@dataclass
class SvdUpdate(ModuleUpdate):
    """The global update as its SVD; clients get their best rank-r approximation."""

    svd: LowRank
    info: dict = field(default_factory=dict)
    numerical: int | None = None  # numerical rank of the full update (kept when truncated)

    def __post_init__(self):
        if self.numerical is None:
            self.numerical = flexlora.numerical_rank(self.svd)

    @property
    def rank(self) -> int:
        return int(self.svd.S.numel())

    @property
    def global_scaling(self) -> float:
        return 1.0

    def client_share(self, rank: int, scaling: float, balanced: bool = False) -> Factors:
        return flexlora.to_lora(flexlora.truncate(self.svd, rank), scaling, balanced)

    def global_rank(self) -> int:
        return max(self.numerical, 1)

    def spectrum(self) -> Tensor:
        spectrum = getattr(self.svd, "spectrum", None)  # a randomized SVD appends its left-out energy
        return spectrum if isinstance(spectrum, Tensor) else self.svd.S

    def keep(self, rank: int) -> SvdUpdate:
        kept = min(rank, self.rank)
        svd = LowRank(self.svd.U[:, :kept].contiguous(), self.svd.S[:kept].contiguous(), self.svd.Vh[:kept].contiguous())
        return SvdUpdate(svd, self.info, self.numerical)

    def tensors(self) -> dict[str, Tensor]:
        return {"U": self.svd.U, "S": self.svd.S, "Vh": self.svd.Vh, "numerical": torch.tensor([self.numerical])}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], info: dict) -> SvdUpdate:
        return cls(LowRank(tensors["U"], tensors["S"], tensors["Vh"]), info, int(tensors["numerical"][0]))


@dataclass
class FactorUpdate(ModuleUpdate):
    """Global LoRA factors meant with one PEFT scaling; clients get the first r columns/rows, raw."""

    B: Tensor  # d_out x r
    A: Tensor  # r x d_in
    scaling: float  # the PEFT scaling the factors are meant with
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def global_scaling(self) -> float:
        return self.scaling

    def client_share(self, rank: int, scaling: float, balanced: bool = False) -> Factors:
        if not 0 < rank <= self.rank:
            raise ValueError(f"rank {rank} is outside 1..{self.rank}: these global factors have rank {self.rank}")
        return self.B[:, :rank], self.A[:rank]

    def global_rank(self) -> int:
        return self.rank

    def keep(self, rank: int) -> FactorUpdate:
        kept = min(rank, self.rank)
        return FactorUpdate(self.B[:, :kept].contiguous(), self.A[:kept].contiguous(), self.scaling, self.info)

    def tensors(self) -> dict[str, Tensor]:
        return {"B": self.B, "A": self.A, "scaling": torch.tensor([self.scaling], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], info: dict) -> FactorUpdate:
        return cls(tensors["B"], tensors["A"], float(tensors["scaling"][0]), info)


def padded_average(clients: ModuleClients, weights: tuple[float, ...] | None = None, dtype: torch.dtype = torch.float32, device=None) -> Factors:
    """Weighted sums of B and of A separately, each zero-padded to the largest rank (weights as given)."""
    weights = clients.weights if weights is None else weights
    d_out, d_in = clients.shape
    r_max = max(clients.ranks)
    B_sum = torch.zeros(d_out, r_max, dtype=dtype, device=device)
    A_sum = torch.zeros(r_max, d_in, dtype=dtype, device=device)
    for (B, A), weight in zip(clients.factors(), weights):
        r = A.shape[0]
        B_sum[:, :r] += weight * B.to(B_sum)
        A_sum[:r] += weight * A.to(A_sum)
    return B_sum, A_sum


def shared_scaling(clients: ModuleClients) -> float:
    """The one PEFT scaling every client of a raw-factor method must share (ValueError otherwise)."""
    first = clients.scalings[0]
    for scaling in clients.scalings[1:]:
        if abs(scaling - first) > 1e-9 * max(abs(first), abs(scaling)):
            raise ValueError(f"clients' PEFT scalings differ ({sorted(set(clients.scalings))}); this method averages raw factors")
    return first
