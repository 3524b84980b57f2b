"""Every aggregation method, as one table: the round skeleton, the CLI's --method choices, the
README's method table and the model cards all read it. No torch here, so `--help` stays fast;
each method's math is in its own module (flexlora_cli.methods.<module>), imported when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One aggregation method and the facts the round needs about it."""

    name: str  # the --method value
    title: str  # how people write it
    paper: str  # the paper's URL
    rule: str  # the server's rule, one sentence
    server_writes: str  # what `flexlora aggregate` writes
    client_step: str  # what a client does with it (and how one that missed the round starts)
    per_client: bool  # writes OUT/<client>/ at each client's own rank (else only OUT/global/)
    raw_factors: bool  # averages raw factors: clients must share one PEFT scaling; clipping scales B
    equal_ranks: bool  # needs every client of a module at one rank
    shares_up_to_largest: bool  # a client's share cannot exceed the module's largest client rank
    svd_options: bool  # --svd and --svd-path apply (the update comes from flexlora_cli.svd_paths)
    spectral: bool  # the global update is an SVD: --energy and split apply to it
    linear: bool  # the global update is a fixed linear combination of the clients' updates (DP noise fits)
    module: str  # flexlora_cli.methods.<module> defines aggregate(clients, settings) -> ModuleUpdate

    def aggregate(self, clients, settings):
        """The method's result for one module (flexlora_cli.methods.base.ModuleUpdate)."""
        return importlib.import_module(f"flexlora_cli.methods.{self.module}").aggregate(clients, settings)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            name="flexlora",
            title="FlexLoRA",
            paper="https://arxiv.org/abs/2402.11505",
            rule="exact weighted update sum_i w_i s_i B_i A_i per module, SVD-truncated to each client's rank",
            server_writes="OUT/<client>/ at each client's rank; with --global, OUT/global/: the exact merged update",
            client_step="load its adapter and train; a client that missed the round runs `flexlora split OUT/global --ranks r`",
            per_client=True, raw_factors=False, equal_ranks=False, shares_up_to_largest=False,
            svd_options=True, spectral=True, linear=True, module="flexlora_method",
        ),
        Method(
            name="hetlora",
            title="HetLoRA",
            paper="https://arxiv.org/abs/2401.06432",
            rule="zero-pad B and A to the largest rank, average each with per-module sparsity weights "
            "w_k ||s_k B_k A_k||_F renormalized (the given weights w_k alone where every update is zero), give client k the first r_k",
            server_writes="OUT/<client>/ with its first r_k columns/rows; with --global, OUT/global/: the padded average at the largest rank",
            client_step="train with the tail penalty lambda ||B[:, g:r]||_F ||A[g:r]||_F (g = floor(gamma r)) and self-prune to rank g "
            "when that tail norm ends local training smaller than it began (client-side, as in the paper); "
            "a client that missed the round takes the first r_k of OUT/global",
            per_client=True, raw_factors=True, equal_ranks=False, shares_up_to_largest=True,
            svd_options=False, spectral=False, linear=False, module="hetlora",
        ),
        Method(
            name="fedavg",
            title="FedAvg (FedIT)",
            paper="https://arxiv.org/abs/2305.05644",
            rule="average B and A separately; every client at one rank",
            server_writes="OUT/<client>/: the averaged factors; with --global, OUT/global/: the same average",
            client_step="load the average and train; a client that missed the round takes OUT/global",
            per_client=True, raw_factors=True, equal_ranks=True, shares_up_to_largest=True,
            svd_options=False, spectral=False, linear=False, module="fedavg",
        ),
        Method(
            name="flora",
            title="FLoRA",
            paper="https://arxiv.org/abs/2409.05976",
            rule="stack every client's factors into one exact adapter of rank sum_i r_i (weights folded into A)",
            server_writes="OUT/global/ only: the stacked adapter (scaling 1)",
            client_step="`flexlora fold BASE OUT/global -o NEW_BASE`, then train a fresh LoRA; a client that missed rounds folds every round it missed",
            per_client=False, raw_factors=False, equal_ranks=False, shares_up_to_largest=False,
            svd_options=False, spectral=False, linear=True, module="flora",
        ),
        Method(
            name="raflora",
            title="RaFLoRA",
            paper="https://arxiv.org/abs/2602.13486",
            rule="rank-partitioned aggregation: the LoRA rank index is split at the distinct client ranks, each partition is averaged "
            "only over the clients whose rank reaches it (weights renormalized among them), and the sum is SVD-truncated to each client's rank",
            server_writes="OUT/<client>/ at each client's rank; with --global, OUT/global/: the sum of the partitions",
            client_step="load its adapter and train; a client that missed the round runs `flexlora split OUT/global --ranks r`",
            per_client=True, raw_factors=False, equal_ranks=False, shares_up_to_largest=False,
            svd_options=True, spectral=True, linear=False, module="raflora",
        ),
        Method(
            name="lora-fair",
            title="LoRA-FAIR",
            paper="https://arxiv.org/abs/2411.14961",
            rule="average A and B (zero-padded), keep A-bar and correct B-bar by the dB minimizing 1 - cos(exact weighted update, "
            "(B-bar + dB) A-bar) + lambda ||dB||^2 / ||B-bar||^2 (option ridge = lambda, default 0.01)",
            server_writes="OUT/<client>/ with its first r_k columns/rows; with --global, OUT/global/: the corrected factors at the largest rank",
            client_step="load its adapter and train; a client that missed the round takes the first r_k of OUT/global",
            per_client=True, raw_factors=True, equal_ranks=False, shares_up_to_largest=True,
            svd_options=False, spectral=False, linear=False, module="lora_fair",
        ),
    )
}

DEFAULT_METHOD = "flexlora"


def get(name: str) -> Method:
    """The registered method called `name` (ValueError naming the choices otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def markdown_table() -> str:
    """The README's method table, from this registry (tests/test_docs.py checks the README holds it)."""
    rows = [
        "| method | rule | paper | the server writes | the client |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        cells = [f"`{m.name}` ({m.title})", m.rule, f"[{m.paper.rsplit('/', 1)[-1]}]({m.paper})", m.server_writes, m.client_step]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
