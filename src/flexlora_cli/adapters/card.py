"""The README.md model card written into every output folder, so a person browsing the Hub can tell
what produced an adapter: which command, which inputs (Hub repo + revision + commit, or local name,
each with content hashes), their weights, the output's rank and the energy it keeps."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft.utils import CONFIG_NAME

from flexlora_cli.adapters.model import Adapter

_WHAT = {
    "merge": "It is the exact weighted sum of the clients' LoRA updates, refactored as one LoRA adapter.",
    "split": "It is the best rank-r approximation (truncated SVD) of its input's LoRA update.",
    "aggregate": "It is this client's share of one FlexLoRA server round: the clients' LoRA updates merged into "
    "their exact weighted sum, then truncated by SVD to this client's rank.",
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_inputs(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> list[CardInput]:
    """Hash each input once, for all the cards of one command."""
    weights = list(weights) if weights is not None else [None] * len(adapters)
    return [_describe(adapter, weight) for adapter, weight in zip(adapters, weights)]


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
) -> str:
    """Markdown with a YAML header the Hub accepts (no base_model there: a local name would be rejected)."""
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
        f"A PEFT LoRA adapter written by `flexlora {command}` (flexlora {__version__}). {_WHAT.get(command, '')}",
        "",
        f"- base model: `{base_model or 'unknown'}`",
        f"- rank: {rank}",
    ]
    if energy_kept is not None:
        lines.append(f"- energy kept: {energy_kept:.4%} of the full update's squared Frobenius norm (all modules)")
    lines += [
        "",
        "## Inputs",
        "",
        "| input | source | weight | ranks | adapter weights sha256 | adapter config sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for item in inputs:
        weight = "-" if item.weight is None else f"{item.weight:.6g}"
        config = f"`{item.config_sha256}`" if item.config_sha256 else "-"
        lines.append(f"| {item.name} | {item.origin} | {weight} | {item.ranks} | `{item.weights_sha256}` | {config} |")
    lines += [
        "",
        "Load it with PEFT: `PeftModel.from_pretrained(base_model, <this folder or repo>)`.",
        "",
    ]
    return "\n".join(lines)


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
