"""A round's safeguards as the verbs apply them: checks of the clipping, screening and privacy settings,
a private round's ledger entry and noise, and what reports, cards and notes say about them. The math is
in trust.py and privacy.py; the clients' norms and verdict in clients.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora_cli import trust
from flexlora_cli.adapters.ledger import Ledger, federation_fingerprint, rounds_of
from flexlora_cli.adapters.model import Adapter
from flexlora_cli.choices import SvdMode
from flexlora_cli.clients import Verdict, screen_reason
from flexlora_cli.compute import Compute
from flexlora_cli.errors import OptionError
from flexlora_cli.methods import registry
from flexlora_cli.privacy import Privacy, accountant_name, epsilon, load_accounting, module_noise, noise_std

SCREEN_MODES = ("drop", "refuse")


@dataclass(frozen=True)
class PrivateRound:
    """A DP round's public report, its ledger (and this round's entry), and each module's noise."""

    report: dict[str, Any]
    ledger: tuple[Ledger, dict] | None
    noise: Callable[[str], Any]


def check_trust(method, clip, screen, threshold, privacy: Privacy | None, num_samples, compute: Compute, push) -> None:
    """Refuse trust and privacy settings that cannot work, before reading any client (OptionError)."""
    if clip is not None and not (_positive(clip)):
        raise OptionError.argument("clip", f"must be a positive number (the largest update norm a client keeps), got {clip!r}")
    if screen is not None and screen not in SCREEN_MODES:
        raise OptionError.argument("screen", f"must be one of {', '.join(SCREEN_MODES)}, got {screen!r}")
    if threshold is not None and screen is None:
        raise OptionError.argument("screen_threshold", "only applies with --screen")
    if threshold is not None and not _positive(threshold):
        raise OptionError.argument("screen_threshold", f"must be a positive number of robust standard deviations, e.g. 3.5; got {threshold!r}")
    if privacy is None:
        return
    if clip is None:
        raise OptionError.argument("dp_noise", "needs --clip C: the noise is sigma * C * max_i w_i, calibrated to the clipping norm")
    if num_samples is not None:
        raise OptionError.argument(
            "num_samples", "cannot be used with --dp-noise: sample counts are the clients' private data; DP needs weights "
            "fixed in advance and public (uniform, or --weights)",
        )
    if screen is not None:
        raise OptionError.argument("screen", "cannot be used with --dp-noise: which clients are left out depends on their data")
    if not (method.linear and method.spectral):
        fitting = ", ".join(m.name for m in registry.METHODS.values() if m.linear and m.spectral)
        raise OptionError.argument(
            "dp_noise", f"{method.name}'s global update is not a fixed linear combination of the clients' updates taken as an SVD, "
            f"so noise on it is not the Gaussian mechanism; use --method {fitting}",
        )
    if compute.svd is not SvdMode.exact or compute.path.value not in ("auto", "dense"):
        option = "svd" if compute.svd is not SvdMode.exact else "svd_path"
        raise OptionError.argument(option, "with --dp-noise the update is the noisy full-size sum, and its exact SVD is taken (dense)")
    if push is not None and "{name}" not in push.repo:
        raise OptionError.argument(
            "push_to_hub", "with --dp-noise one repo would hold a folder per client, i.e. the list of participants; "
            "push each client's adapter to its own repo with a {name} template, e.g. org/fl-{name}",
        )


def private_round(privacy: Privacy, clip: float, adapters: Sequence[Adapter], shares: Sequence[float], weights, output: Path) -> PrivateRound:
    """Check the clients and the ledger for a DP round and account for it, before any work."""
    for adapter in adapters:
        if adapter.extra_keys:
            raise OptionError.argument(
                "dp_noise", f"{adapter.name} has modules_to_save tensors ({adapter.extra_keys[0]}): full weights, not LoRA updates, "
                "would need clipping and noise of their own",
            )
    load_accounting()  # a missing package fails now, not after the work
    ledger = None
    if privacy.ledger is not None:
        modules = {name: (m.d_out, m.d_in) for a in adapters for name, m in a.modules.items()}
        fingerprint = federation_fingerprint(adapters[0].base_model, modules)
        ledger = Ledger.open(privacy.ledger, fingerprint, output=output, inputs=[a.path for a in adapters])
    rounds = [*rounds_of(ledger), (privacy.noise, privacy.sampling_rate)]
    std = noise_std(privacy.noise, clip, shares)
    report = {
        "mechanism": "Gaussian noise on the weighted sum of clipped client updates (client-level DP, add/remove one client)",
        "noise_multiplier": privacy.noise,
        "clip": clip,
        "weights": "uniform" if weights is None else "fixed (--weights)",
        "max_weight": max(shares),
        "noise_std": std,
        "sampling_rate": privacy.sampling_rate,
        "rounds": len(rounds),
        "delta": privacy.delta,
        "epsilon": epsilon(rounds, privacy.delta),
        "accountant": accountant_name(),
        "noise_source": "seeded (--seed: reproducible, no privacy against whoever knows the seed)" if privacy.seed is not None
        else "secure random (OS)",
        "ledger": str(ledger.path) if ledger else None,
        "federation": ledger.federation["id"] if ledger else None,
        "new_ledger": ledger.new if ledger else None,
    }
    entry = {"noise_multiplier": privacy.noise, "sampling_rate": privacy.sampling_rate}
    round_key = f"{ledger.federation['id']}:{len(rounds)}" if ledger else ""  # a seed repeats no round's noise
    return PrivateRound(report, (ledger, entry) if ledger else None, lambda name: module_noise(std, name, privacy.seed, round_key))


def screen_settings(screen: str | None, threshold: float | None) -> dict[str, Any] | None:
    if screen is None:
        return None
    return {"mode": screen, "rule": "per-rank log-MAD", "threshold": threshold or trust.SCREEN_THRESHOLD}


def card_trust(clip, screen, threshold, verdict: Verdict, private: PrivateRound | None) -> dict[str, Any]:
    """What the model cards say about trust: the DP report alone under DP, else the settings."""
    if private is not None:
        return {"privacy": private.report}
    return {"clip": clip, "screen": screen_settings(screen, threshold)}


def trust_notes(adapters: Sequence[Adapter], verdict: Verdict, privacy: Privacy | None, private: PrivateRound | None) -> list[str]:
    notes = [
        f"{adapters[i].name} was left out of the round: {screen_reason(verdict.screening, i)}; it still receives the round's result"
        for i in verdict.left_out
    ]
    if privacy is not None and privacy.seed is not None:
        notes.append("--seed makes the noise reproducible: whoever knows the seed can remove it; use it for tests only")
        if privacy.ledger is None:
            notes.append("--seed without --dp-ledger: the same seed in another round repeats this round's noise exactly "
                         "(with a ledger each round's noise differs)")
    if private is not None and private.report["new_ledger"]:
        notes.append(f"started a new DP ledger {private.report['ledger']}: this round is its federation's first private round")
    return notes


def _positive(number) -> bool:
    return isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) and number > 0
