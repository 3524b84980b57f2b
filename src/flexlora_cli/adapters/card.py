"""The README.md model card written into every output folder, so a person browsing the Hub can tell
what produced an adapter: which command, which inputs (Hub repo + revision + commit, or local name,
each with content hashes), their weights, the output's rank and the energy it keeps."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flexlora_cli.adapters.files import CONFIG_NAME

from flexlora_cli.adapters.model import Adapter

_WHAT = {
    "merge": "It is the exact weighted sum of the clients' LoRA updates, refactored as one LoRA adapter.",
    "split": "It is the best rank-r approximation (truncated SVD) of its input's LoRA update.",
}


@dataclass(frozen=True)
class CardInput:
    """One input as the card lists it."""

    name: str
    origin: str  # "Hub `org/name` @ `rev` (commit `abc…`)" or "local folder `alice`"
    weight: float | None
    ranks: str
    weights_sha256: str
    config_sha256: str | None
    update_norm: float | None = None  # ||dW||_F over its modules (aggregate; never under DP)
    clip_factor: float | None = None  # with --clip
    screened: bool = False  # left out of the round by --screen


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_inputs(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, trust: Sequence[dict] | None = None) -> list[CardInput]:
    """Hash each input once, for all the cards of one command; `trust`: per input its update_norm,
    clip_factor and screened (flexlora_cli.clients.trust_reports)."""
    weights = list(weights) if weights is not None else [None] * len(adapters)
    trust = list(trust) if trust is not None else [{}] * len(adapters)
    return [
        replace(_describe(adapter, weight), update_norm=t.get("update_norm"), clip_factor=t.get("clip_factor"), screened=bool(t.get("screened")))
        for adapter, weight, t in zip(adapters, weights, trust)
    ]


def describe_file(path: Path) -> CardInput:
    """An input that is a single file (a `merge --dense` update)."""
    return CardInput(path.name, f"local file `{path.name}`", None, "dense", file_sha256(path), None)


def model_card(
    command: str,
    title: str,
    inputs: Sequence[CardInput],
    *,
    base_model: str | None,
    rank: str,
    energy_kept: float | None,
    method=None,
    trust: dict | None = None,
) -> str:
    """Markdown with a YAML header the Hub accepts (no base_model there: a local name would be rejected).

    `trust`: {"privacy": report} for a DP round (the card then lists no inputs, norms or participants),
    else {"clip": C or None, "screen": settings or None}.
    """
    from flexlora_cli import __version__

    lines = [
        "---",
        "library_name: peft",
        "tags:",
        "- flexlora",
        "- lora",
        "- federated-learning",
        "---",
        "",
        f"# FlexLoRA {command} output: {title}",
        "",
        f"A PEFT LoRA adapter written by `flexlora {command}` (flexlora {__version__}). {_what(command, method, title)}",
        "",
        f"- base model: `{base_model or 'unknown'}`",
        f"- rank: {rank}",
    ]
    if energy_kept is not None:
        lines.append(f"- energy kept: {energy_kept:.4%} of the full update's squared Frobenius norm (all modules)")
    privacy = (trust or {}).get("privacy")
    lines += _privacy_lines(privacy) if privacy else _input_lines(inputs, trust or {})
    lines += [
        "",
        "Load it with PEFT: `PeftModel.from_pretrained(base_model, <this folder or repo>)`.",
        "",
    ]
    return "\n".join(lines)


def _input_lines(inputs: Sequence[CardInput], trust: dict) -> list[str]:
    """The inputs table, with each input's update norm (and clip factor, screening) where known."""
    normed = any(item.update_norm is not None for item in inputs)
    clipped = trust.get("clip") is not None
    screen = trust.get("screen")
    header = "| input | source | weight | ranks |" + (" update norm |" if normed else "") + (" clip factor |" if clipped else "")
    header += (" screened out |" if screen else "") + " adapter weights sha256 | adapter config sha256 |"
    lines = ["", "## Inputs", ""]
    if clipped:
        lines += [f"Each client's update was scaled by its clip factor min(1, C / norm) before weighting, C = {trust['clip']:g}.", ""]
    if screen:
        lines += [f"Screened with the per-rank log-MAD rule at threshold {screen['threshold']:g}: a client screened out took no part "
                  "in the round (weight 0) and still received its result.", ""]
    lines += [header, "|" + "---|" * header.count(" |")]
    for item in inputs:
        weight = "-" if item.weight is None else f"{item.weight:.6g}"
        config = f"`{item.config_sha256}`" if item.config_sha256 else "-"
        cells = [item.name, item.origin, weight, item.ranks]
        cells += [f"{item.update_norm:.6g}"] if normed else []
        cells += [f"{item.clip_factor:.6g}" if item.clip_factor is not None else "-"] if clipped else []
        cells += ["yes" if item.screened else "no"] if screen else []
        lines.append("| " + " | ".join([*cells, f"`{item.weights_sha256}`", config]) + " |")
    return lines


def _privacy_lines(report: dict) -> list[str]:
    """The DP section: public facts only (no inputs, norms or participants)."""
    rounds = f"{report['rounds']} round{'s' if report['rounds'] != 1 else ''}"
    ledger = f" of federation `{report['federation']}`" if report.get("federation") else " (this round only: no ledger)"
    return [
        "",
        "## Differential privacy",
        "",
        f"- guarantee: ({report['epsilon']:.4g}, {report['delta']:g})-DP at the client level (add/remove one client), "
        f"over {rounds}{ledger}, by the {report['accountant']} accountant",
        f"- mechanism: {report['mechanism']}; noise multiplier {report['noise_multiplier']:g}, clipping norm {report['clip']:g}, "
        f"weights {report['weights']} (largest {report['max_weight']:.6g}), client sampling rate {report['sampling_rate']:g}",
        "- the inputs are not listed: under differential privacy this card names no participant",
    ]


def _what(command: str, method, title: str) -> str:
    """What the adapter is, in a sentence; for aggregate, by the method's registry entry."""
    if command != "aggregate" or method is None:
        return _WHAT.get(command, "")
    share = "the round's global result" if title == "global" else "this client's share of the round"
    return f"It is {share}, aggregated with {method.title} ({method.paper}): {method.rule}."


def _describe(adapter: Adapter, weight: float | None) -> CardInput:
    hub = adapter.provenance
    if hub.get("repo_id"):
        origin = f"Hub `{hub['repo_id']}`"
        if hub.get("subfolder"):
            origin += f" folder `{hub['subfolder']}`"
        origin += f" @ `{hub.get('revision') or 'main'}`"
        if hub.get("commit"):
            origin += f" (commit `{hub['commit']}`)"
    else:  # the folder's own name only: absolute paths would leak the server's layout
        origin = f"local folder `{adapter.path.resolve().name}`"
    ranks = ",".join(str(r) for r in sorted({m.rank for m in adapter.modules.values()}))
    config = adapter.path / CONFIG_NAME
    return CardInput(
        adapter.name, origin, weight, ranks, file_sha256(adapter.weights_path),
        file_sha256(config) if config.is_file() else None,
    )


def rank_summary(ranks) -> str:
    """'8', or '4-64 (per module)' when modules differ."""
    values = sorted(set(ranks))
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]} (per module)"
