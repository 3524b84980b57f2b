"""FLoRA (Wang et al., NeurIPS 2024): stack every client's factors into one exact global adapter.

B_s = [B_1, ..., B_n] and A_s = [c_1 A_1; ...; c_n A_n] with c_i = w_i s_i, so that the stacked
adapter at scaling 1 applies exactly sum_i w_i s_i B_i A_i. FLoRA hands clients no adapter of their
own: each folds the global adapter into its base weights and starts a fresh LoRA.
"""

from __future__ import annotations

import torch

from flexlora_cli.methods.base import FactorUpdate, MathSettings, ModuleClients


def aggregate(clients: ModuleClients, settings: MathSettings) -> FactorUpdate:
    Bs, As = [], []
    for term in clients.terms():
        Bs.append(term.B.to(settings.dtype))
        As.append(term.coeff * term.A.to(settings.dtype))
    return FactorUpdate(torch.cat(Bs, dim=1), torch.cat(As, dim=0), 1.0)
