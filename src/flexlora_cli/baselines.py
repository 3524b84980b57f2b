"""Baseline aggregators that FlexLoRA is compared with, as pure tensor math.

For one adapted module, client i holds LoRA factors B_i (d_out x r_i) and A_i (r_i x d_in).

- HetLoRA (Cho et al., 2024): zero-pad every B_i and A_i to the largest rank r_max, average B and
  A separately with the client weights, give client i the first r_i columns of B and rows of A.
- FedAvg / FedIT: average B and A separately; only defined when every client has the same rank
  (the "bucket effect" baseline: everyone trains at the smallest rank).
- FLoRA (Wang et al., 2024): stack the factors into one exact adapter of rank sum_i r_i whose
  product is sum_i c_i B_i A_i; the coefficients c_i = w_i * s_i are folded into A.

HetLoRA and FedAvg average the *raw* factors, as the papers do: each client's own PEFT scaling
is applied to what it gets back, so they are faithful only when clients share one scaling.
Averaging factors separately is not averaging updates: mean(B) @ mean(A) != mean(B @ A).

No files, no network: tensors in, tensors out. Bad arguments raise ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexlora_cli.flexlora import LoraTerm, normalize_weights

Factors = tuple[Tensor, Tensor]  # (B, A): B is d_out x r, A is r x d_in


def padded_average(
    factors: Sequence[Factors], weights: Sequence[float] | None = None, dtype: torch.dtype = torch.float32
) -> Factors:
    """Weighted average of B and A separately, each zero-padded to the largest rank first."""
    d_out, d_in = _check_layout(factors)
    shares = normalize_weights(weights, len(factors))
    r_max = max(A.shape[0] for _, A in factors)
    B_avg = torch.zeros(d_out, r_max, dtype=dtype, device=factors[0][0].device)
    A_avg = torch.zeros(r_max, d_in, dtype=dtype, device=factors[0][1].device)
    for (B, A), share in zip(factors, shares):
        r = A.shape[0]
        B_avg[:, :r] += share * B.to(dtype)
        A_avg[:r] += share * A.to(dtype)
    return B_avg, A_avg


def hetlora(
    factors: Sequence[Factors],
    weights: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Factors]:
    """HetLoRA's round: each client gets the first r_i columns/rows of the padded average.

    Args:
        factors: (B_i, A_i) per client.
        weights: aggregation weights (normalized here); uniform when None.
        ranks: the rank each client gets back; default: its own. At most the largest input rank,
            since the padded average has no directions beyond it.

    Returns:
        (B_i', A_i') per client, B_i' = B_avg[:, :r_i] and A_i' = A_avg[:r_i].
    """
    B_avg, A_avg = padded_average(factors, weights, dtype)
    own = [A.shape[0] for _, A in factors]
    ranks = own if ranks is None else list(ranks)
    if len(ranks) != len(factors):
        raise ValueError(f"got {len(ranks)} ranks for {len(factors)} clients")
    r_max = A_avg.shape[0]
    for r in ranks:
        if not 0 < r <= r_max:
            raise ValueError(f"rank {r} is outside 1..{r_max}: HetLoRA's global adapter has the largest client rank {r_max}")
    return [(B_avg[:, :r].clone(), A_avg[:r].clone()) for r in ranks]


def fedavg(factors: Sequence[Factors], weights: Sequence[float] | None = None, dtype: torch.dtype = torch.float32) -> Factors:
    """FedAvg/FedIT: the weighted average of B and of A; every client must have the same rank."""
    _check_layout(factors)
    ranks = [A.shape[0] for _, A in factors]
    if len(set(ranks)) > 1:
        raise ValueError(
            f"FedAvg averages B and A entry by entry and needs equal ranks, got {ranks}; "
            "train every client at one rank or use HetLoRA/FlexLoRA"
        )
    return padded_average(factors, weights, dtype)


def flora(terms: Sequence[LoraTerm], dtype: torch.dtype = torch.float32) -> Factors:
    """FLoRA's stacked global adapter (B_s, A_s) of rank sum_i r_i, with B_s @ A_s = sum_i c_i B_i A_i.

    B_s = [B_1, ..., B_n] and A_s = [c_1 A_1; ...; c_n A_n]: FLoRA folds the weights into A, so
    the stacked adapter is exact with PEFT scaling 1. (flexlora.stack_terms folds them into B.)
    """
    if not terms:
        raise ValueError("need at least one LoRA term")
    _check_layout([(term.B, term.A) for term in terms])
    B_s = torch.cat([term.B.to(dtype) for term in terms], dim=1)
    A_s = torch.cat([term.coeff * term.A.to(dtype) for term in terms], dim=0)
    return B_s, A_s


def _check_layout(factors: Sequence[Factors]) -> tuple[int, int]:
    """(d_out, d_in) shared by all clients; ValueError on empty input or mismatched shapes."""
    if not factors:
        raise ValueError("need at least one client's factors")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for index, (B, A) in enumerate(factors):
        if B.ndim != 2 or A.ndim != 2:
            raise ValueError(f"client {index}: LoRA factors must be matrices, got {tuple(B.shape)} and {tuple(A.shape)}")
        if B.shape[1] != A.shape[0] or A.shape[0] == 0:
            raise ValueError(f"client {index}: B is {tuple(B.shape)} but A is {tuple(A.shape)}; their ranks differ or are zero")
        if (B.shape[0], A.shape[1]) != (d_out, d_in):
            raise ValueError(f"client {index}: update is {B.shape[0]}x{A.shape[1]}, client 0's is {d_out}x{d_in}")
    return d_out, d_in
