"""FlexLoRA (Bai et al., NeurIPS 2024): the exact weighted update, as its SVD.

The global update of a module is sum_i w_i s_i B_i A_i; svd_paths picks the cheapest exact way to
its SVD (or a randomized one for the top components when asked). Each client's share is the best
rank-r_i approximation (SvdUpdate.client_share).
"""

from __future__ import annotations

from flexlora_cli import privacy, svd_paths
from flexlora_cli.methods.base import MathSettings, ModuleClients, SvdUpdate


def aggregate(clients: ModuleClients, settings: MathSettings) -> SvdUpdate:
    if settings.noise is not None:  # DP: noise goes on the full-size sum, so the dense path
        svd = privacy.noisy_dense_svd(clients.terms, clients.shape, settings.noise, settings.dtype, settings.device)
        return SvdUpdate(svd, {"path": "dense"})
    return SvdUpdate(*update_svd(clients.terms, clients.shape, list(clients.ranks), settings))


def update_svd(terms, shape: tuple[int, int], ranks: list[int], settings: MathSettings):
    """(svd, info) of sum_i c_i B_i A_i for `terms` (a callable giving a fresh pass of LoraTerms).

    info names the SVD path and, where settings.check_randomized, the randomized SVD's error
    against the exact truncation at settings.top_k.
    """
    plan = _plan(settings, shape, ranks, settings.top_k)
    svd = svd_paths.run_path(plan, terms, shape, settings.dtype, settings.device)
    info = {"path": plan.path}
    if not plan.exact and settings.check_randomized:
        exact = svd_paths.run_path(_plan(settings, shape, ranks, None), terms, shape, settings.dtype, settings.device)
        info["randomized_error"] = svd_paths.truncation_error(svd, exact, plan.top_k)
    return svd, info


def _plan(settings: MathSettings, shape: tuple[int, int], ranks: list[int], top_k: int | None) -> svd_paths.PathPlan:
    randomized = settings.svd == "randomized" and top_k is not None
    itemsize = settings.dtype.itemsize
    return svd_paths.choose_path(
        *shape, ranks, svd="randomized" if randomized else "exact", top_k=top_k if randomized else None,
        path=settings.path, itemsize=itemsize, rates=settings.rates or svd_paths.CPU_RATES,
    )
