"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): sparsity-weighted aggregation of zero-padded factors.

Per module, client k's factors are zero-padded to the largest client rank and B and A are averaged
separately with the paper's sparsity weights ||dW_k||_F / sum_j ||dW_j||_F, dW_k = s_k B_k A_k:
a client whose update carries more energy counts more. Given weights (--weights / --num-samples,
`clients.weights`) multiply them and the products are renormalized; where they all vanish (every
update is zero, as before any training), the given weights alone are used. Client k takes the first
r_k columns of B and rows of A (FactorUpdate).

Rank self-pruning is the client's step in the paper, not the server's: during local training the
client adds lambda * ||B_k[:, g:r_k]||_F * ||A_k[g:r_k, :]||_F (g = floor(gamma * r_k), gamma < 1)
to its loss, and drops those trailing ranks (r_k <- g) when that tail norm ends local training
smaller than it started.
"""

from __future__ import annotations

import math

import torch

from flexlora_cli import trust
from flexlora_cli.methods.base import FactorUpdate, MathSettings, ModuleClients, padded_average, shared_scaling


def aggregate(clients: ModuleClients, settings: MathSettings) -> FactorUpdate:
    scaling = shared_scaling(clients)
    weights = sparsity_weights(clients)
    B, A = padded_average(clients, weights, dtype=settings.dtype, device=settings.device)
    return FactorUpdate(B, A, scaling, info={"weights": list(weights)})


def sparsity_weights(clients: ModuleClients) -> tuple[float, ...]:
    """w_k ||dW_k||_F / sum_j w_j ||dW_j||_F, or the given weights w where every product is zero."""
    factors = zip(clients.factors(), clients.weights, clients.scalings)
    products = [weight * abs(scaling) * update_norm(B, A) for (B, A), weight, scaling in factors]
    total = math.fsum(products)
    if total == 0.0:
        return tuple(clients.weights)
    return tuple(product / total for product in products)


def update_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F from the factors, in fp64 (trust.update_norm_squared: no d_out x d_in matrix)."""
    return math.sqrt(trust.update_norm_squared(B, A, torch.float64))
