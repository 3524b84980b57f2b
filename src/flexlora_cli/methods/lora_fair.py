"""LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): averaged factors with a server-side correction of B.

The server averages A and B separately (zero-padded to the largest rank; weights w_k), keeps the
averaged A-bar as every client's next starting point, and corrects B-bar by the residual dB that
solves the paper's objective

    min_dB  S(dW, (B-bar + dB) A-bar) + lambda * ||dB||^2,     dW = sum_k w_k B_k A_k,

with S = 1 - cosine similarity (Frobenius), so (B-bar + dB) A-bar points along the exact weighted
update while B-bar' = B-bar + dB stays close to the average that clients resume from. (dW is the
update over the clients' one shared scaling s; the cosine does not see s.) Reading, from a summary
of the paper and public implementations derived from its code (the paper's text was not available
here): S is the cosine similarity and the penalty is lambda ||dB||^2 with lambda = 0.01, solved by
SGD from a random start. Here the same objective is solved to convergence by L-BFGS from dB = 0
(deterministic; dB stays 0 when B-bar A-bar is already parallel to dW), and lambda is relative to
||B-bar||_F^2 so the result does not depend on the factors' scale: settings.options["ridge"]
(default 0.01, the paper's value). Where dW = 0 or B-bar A-bar = 0 the cosine is undefined and B-bar
is kept. The solve never forms the d_out x d_in update: with C = dW A-bar^T = sum_k w_k B_k (A_k
A-bar^T) and G = A-bar A-bar^T, <dW, B A-bar> = <C, B> and ||B A-bar||^2 = <B^T B, G>.

Unequal ranks are zero-padded, as in HetLoRA (the paper assumes equal ranks); client k takes the
first r_k columns/rows. Like FedAvg it averages raw factors, so clients must share one scaling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexlora_cli.flexlora import LoraTerm, stack_terms
from flexlora_cli.methods.base import FactorUpdate, MathSettings, ModuleClients, padded_average, shared_scaling

DEFAULT_RIDGE = 0.01  # the paper's lambda, here relative to ||B-bar||_F^2
MAX_ITERATIONS = 500


def aggregate(clients: ModuleClients, settings: MathSettings) -> FactorUpdate:
    scaling = shared_scaling(clients)
    ridge = float(settings.options.get("ridge", DEFAULT_RIDGE))
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"LoRA-FAIR's ridge must be a finite number >= 0, got {ridge}")
    B_bar, A_bar = padded_average(clients, dtype=settings.dtype, device=settings.device)
    # dW A-bar^T and ||dW||_F from the stacked factors [w_k B_k] and [A_k] (weights only: s is shared)
    B_cat, A_cat = stack_terms(list(_weighted_terms(clients)), settings.dtype)
    C = B_cat @ (A_cat @ A_bar.mT)
    norm = math.sqrt(max(float(((B_cat.mT @ B_cat) * (A_cat @ A_cat.mT)).sum()), 0.0))
    # The solve is small (d_out x r) but iterative on a flat objective: fp32 would stop ~1e-3 short.
    correction, cosines = correct_b(B_bar.double(), (A_bar @ A_bar.mT).double(), C.double(), norm, ridge)
    correction = correction.to(settings.dtype)
    info = {"cosine_before": cosines[0], "cosine_after": cosines[1],
            "correction": float(torch.linalg.norm(correction) / max(float(torch.linalg.norm(B_bar)), 1e-300))}
    return FactorUpdate(B_bar + correction, A_bar, scaling, info=info)


def correct_b(B_bar: Tensor, G: Tensor, C: Tensor, norm: float, ridge: float) -> tuple[Tensor, tuple[float, float]]:
    """dB minimizing 1 - <C, B>/(norm ||B||_G) + ridge ||dB||^2/||B-bar||^2 (B = B-bar + dB), and the cosines.

    ||B||_G^2 = <B^T B, G>. Solved in the scale-free variable Z = dB / ||B-bar||_F.
    """
    scale = float(torch.linalg.norm(B_bar))
    start = _cosine(B_bar, G, C, norm)
    if norm == 0.0 or start is None:
        return torch.zeros_like(B_bar), (start or 0.0, start or 0.0)
    Z = torch.zeros_like(B_bar)
    eps = torch.finfo(B_bar.dtype).eps
    solver = torch.optim.LBFGS([Z], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20, line_search_fn="strong_wolfe",
                               tolerance_grad=1e-2 * math.sqrt(eps), tolerance_change=eps)

    def objective():
        B = B_bar + scale * Z
        inner, length = float((C * B).sum()), math.sqrt(max(float((B.mT @ B * G).sum()), 0.0))
        if length == 0.0:  # the cosine is undefined at B A-bar = 0: the worst value, so the line search backs off
            Z.grad = 2 * ridge * Z
            return torch.tensor(2.0 + ridge * float((Z * Z).sum()), dtype=torch.float64)
        # gradient of -cos in B: -(C / (norm t) - <C, B> B G / (norm t^3)), chained through B = B-bar + scale Z
        Z.grad = -scale * (C / (norm * length) - inner * (B @ G) / (norm * length**3)) + 2 * ridge * Z
        return torch.tensor(1.0 - inner / (norm * length) + ridge * float((Z * Z).sum()), dtype=torch.float64)

    solver.step(objective)
    correction = scale * Z.detach()
    return correction, (start, _cosine(B_bar + correction, G, C, norm) or 0.0)


def _cosine(B: Tensor, G: Tensor, C: Tensor, norm: float) -> float | None:
    """cos(dW, B A-bar), or None where B A-bar = 0."""
    square = float((B.mT @ B * G).sum())
    if square <= 0.0 or norm == 0.0:
        return None
    return float((C * B).sum()) / (norm * math.sqrt(square))


def _weighted_terms(clients: ModuleClients):
    for (B, A), weight in zip(clients.factors(), clients.weights):
        yield LoraTerm(B, A, weight)
