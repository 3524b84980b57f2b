"""FedAvg / FedIT on LoRA: average B and A separately; every client at one rank.

Averaging factors is not averaging updates (mean(B) @ mean(A) != mean(B @ A)); that is the
baseline's known bias, kept faithfully. The factors are raw: PEFT applies the clients' one shared
scaling to them.
"""

from __future__ import annotations

from flexlora_cli.methods.base import FactorUpdate, MathSettings, ModuleClients, padded_average, shared_scaling


def aggregate(clients: ModuleClients, settings: MathSettings) -> FactorUpdate:
    if len(set(clients.ranks)) > 1:
        raise ValueError(f"FedAvg averages B and A entry by entry and needs equal ranks, got {list(clients.ranks)}")
    scaling = shared_scaling(clients)
    B, A = padded_average(clients, dtype=settings.dtype, device=settings.device)
    return FactorUpdate(B, A, scaling)
