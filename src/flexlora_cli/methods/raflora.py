"""RaFLoRA (Wu et al., arXiv 2602.13486): rank-partitioned aggregation, then FlexLoRA's SVD truncation.

With SVD redistribution and rank-agnostic weights, the directions beyond the smallest client rank
are averaged together with the zeros of the clients that cannot hold them, so their share of the
global update shrinks geometrically over rounds ("rank collapse"). RaFLoRA splits the LoRA rank
index at the distinct client ranks r_(1) < r_(2) < ...: partition p holds indices
r_(p-1) .. r_(p)-1 of every client's factors, and is averaged only over the clients whose rank
reaches r_(p), with their weights renormalized among them:

    dW = sum_p sum_{k: r_k >= r_(p)} (w_k / W_p) s_k B_k[:, P_p] A_k[P_p, :],   W_p = sum_{k: r_k >= r_(p)} w_k

Partitions are by LoRA rank index, not by each client's own singular components: clients start a
round from SVD-ordered factors (B = U S / s, A = Vh), so index p is the p-th direction they were
handed. This reading follows the paper's abstract and a third-party implementation that cites its
Algorithm 1 / Eq. (8); the paper's own method section was not available to check it against.
With equal ranks there is one partition and RaFLoRA is FlexLoRA. The sum is a sum of low-rank
terms (one per client, its B columns scaled by their partition's coefficient), so its exact SVD
comes from flexlora_cli.svd_paths as FlexLoRA's does; clients get their best rank-r_k share.
"""

from __future__ import annotations

import math

import torch

from flexlora_cli.flexlora import LoraTerm
from flexlora_cli.methods.base import MathSettings, ModuleClients, SvdUpdate
from flexlora_cli.methods.flexlora_method import update_svd


def aggregate(clients: ModuleClients, settings: MathSettings) -> SvdUpdate:
    coefficients = column_coefficients(clients)

    def terms():
        for index, (B, A) in enumerate(clients.factors()):
            column = torch.tensor(coefficients[index], dtype=settings.dtype, device=B.device)
            yield LoraTerm(B.to(settings.dtype) * column, A, 1.0)

    svd, info = update_svd(terms, clients.shape, list(clients.ranks), settings)
    info["partitions"] = [list(bounds) for bounds in partitions(clients.ranks)]
    return SvdUpdate(svd, info)


def partitions(ranks) -> list[tuple[int, int]]:
    """Rank-index ranges [lo, hi) split at the distinct client ranks."""
    bounds = [0, *sorted(set(ranks))]
    return list(zip(bounds[:-1], bounds[1:]))


def column_coefficients(clients: ModuleClients) -> list[list[float]]:
    """Per client, the factor (w_k / W_p) s_k for each of its B columns (its rank index's partition p)."""
    coefficients = [[0.0] * rank for rank in clients.ranks]
    for lo, hi in partitions(clients.ranks):
        members = [k for k, rank in enumerate(clients.ranks) if rank >= hi]
        total = math.fsum(clients.weights[k] for k in members)
        for k in members:
            share = clients.weights[k] / total if total > 0 else 0.0  # only zero-weight clients reach it
            coefficients[k][lo:hi] = [share * clients.scalings[k]] * (hi - lo)
    return coefficients
