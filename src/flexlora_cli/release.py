"""Releasing a round's outputs: each written into the output's staging folder, then the manifest, the DP
ledger and the Hub push, and only then the one move into place (adapters/output.py). The verbs (api.py)
decide what is computed and written; this is how every verb writes it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora_cli import round as round_
from flexlora_cli.adapters import card, hub
from flexlora_cli.adapters.dense import DENSE_FILE_NAME, write_dense
from flexlora_cli.adapters.ledger import Ledger
from flexlora_cli.adapters.model import Adapter
from flexlora_cli.adapters.output import OutputFolder
from flexlora_cli.adapters.write import write_adapter
from flexlora_cli.compute import Compute
from flexlora_cli.outputs import Output
from flexlora_cli.round import ProgressHook
from flexlora_cli.store import UpdateStore

SPILL_FOLDER = ".flexlora-spill"  # inside the staging folder; removed before the output is moved into place

# What a --push-to-hub template may name, per command.
PUSH_FIELDS = {"merge": (), "split": ("rank",), "aggregate": ("name",)}


@dataclass(frozen=True)
class Push:
    """Where to upload a verb's output: a repo (org/name, hf://org/name@branch/folder) or a template
    with {name} (aggregate) or {rank} (split), one repo per adapter."""

    repo: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    token: str | None = None


def run_round(
    command: str,
    target: Path,
    inputs: Sequence[Adapter | Path],
    updates: round_.Updates,
    outputs: Sequence[Output],
    compute: Compute,
    *,
    cards: Callable[[Sequence[Output]], dict[str, str]],
    manifest: dict[str, Any] | Callable[[], dict[str, Any]],
    overwrite: bool,
    progress: ProgressHook | None,
    push: Push | None,
    options: dict | None = None,
    dense: bool = False,
    ledger: tuple[Ledger, dict] | None = None,
    noise: Callable[[str], Any] | None = None,
) -> round_.RoundResult:
    """Check and lock OUT, compute every module, write every output into staging, then move it into place.

    `ledger` (a DP round's ledger and its entry for this round) is written before the output is
    released (pushed, or moved into place): a crash in between over-counts this round, never under-counts
    it. It is put back only when the round failed without releasing anything (no push, OUT unchanged).
    """
    try:
        return _write_round(command, target, inputs, updates, outputs, compute, cards=cards, manifest=manifest, overwrite=overwrite,
                            progress=progress, push=push, options=options, dense=dense, ledger=ledger, noise=noise)
    except BaseException as error:
        if ledger is not None and push is None and getattr(error, "output_state", "old") == "old":
            with contextlib.suppress(OSError):  # should that fail too, the ledger over-counts: the safe side
                ledger[0].restore()
        raise


def _write_round(command, target, inputs, updates, outputs, compute, *, cards, manifest, overwrite, progress, push, options, dense,
                 ledger, noise) -> round_.RoundResult:
    paths = [i.path if isinstance(i, Adapter) else Path(i) for i in inputs]
    files = [i.weights_path for i in inputs if isinstance(i, Adapter)]
    with OutputFolder(target, inputs=[*paths, *files], overwrite=overwrite, command=command) as out:
        store = UpdateStore(out.staging / SPILL_FOLDER)
        result = round_.compute(updates, outputs, compute, store=store, options=options, keep_exact=dense, progress=progress, noise=noise)
        written = cards(outputs)
        for output in outputs:
            tensors = round_.output_tensors(result, output, compute.balanced)
            write_adapter(out.staging / output.folder, output.config(), tensors, card=written.get(output.folder))
            del tensors
        if dense:
            merged = outputs[0]
            write_dense(out.staging / DENSE_FILE_NAME, merged.config(), round_.dense_deltas(result, merged.modules, merged.dtype))
        store.clear()
        if callable(manifest):  # facts known only after the round (e.g. norms summed while reading)
            manifest = manifest()
        report = {
            **manifest,
            # under DP the folders' names would list the participants: the manifest holds public facts only
            **({} if "privacy" in manifest else
               {"outputs": {o.folder or ".": {"ranks": card.rank_summary(o.ranks.values()), "energy_kept": o.energy} for o in outputs}}),
            "compute": {"precision": compute.precision.value, "svd": compute.svd.value, "svd_path": compute.path.value,
                        "balanced": compute.balanced, "dtype": compute.dtype.value if compute.dtype else None},
        }
        def before_move(staging: Path) -> None:
            if ledger is not None:  # counted before anything is released
                ledger[0].commit(ledger[1])
            if push is not None:
                result.pushed = _push(command, staging, target, outputs, push)

        out.commit(report, before_move=before_move if push is not None or ledger is not None else None)
    return result


def check_push(command: str, push: Push | None) -> None:
    """Refuse a push target that cannot work, before any computation (OptionError)."""
    if push is not None:
        hub.check_target(push.repo, PUSH_FIELDS[command], push.revision, push.create_pr)


def _push(command: str, staging: Path, target: Path, outputs: Sequence[Output], push: Push) -> list[dict]:
    """Upload the written adapters from the staging folder, before they are moved into place."""
    items = []
    for output in outputs:
        fields = {"name": output.folder, "rank": output.folder.removeprefix("rank-")}
        items.append(hub.PushItem(staging / output.folder, output.folder, {k: fields[k] for k in PUSH_FIELDS[command]}))
    return hub.push(
        items, push.repo, commit_message=push.commit_message or f"FlexLoRA {command} output",
        commit_description=f"Written by `flexlora {command}`; each adapter folder has a README.md describing its inputs.",
        private=push.private, revision=push.revision, create_pr=push.create_pr, token=push.token,
    )


def pushed_report(result: round_.RoundResult) -> dict[str, Any]:
    pushed = getattr(result, "pushed", None)
    return {"pushed": pushed, "commit_urls": [entry["url"] for entry in pushed]} if pushed is not None else {}


def manifest_inputs(inputs: Sequence[card.CardInput]) -> list[dict[str, Any]]:
    return [
        {"name": i.name, "origin": i.origin, "weight": i.weight, "ranks": i.ranks, "weights_sha256": i.weights_sha256,
         "config_sha256": i.config_sha256,
         **({"update_norm": i.update_norm, "clip_factor": i.clip_factor, "screened": i.screened} if i.update_norm is not None else {})}
        for i in inputs
    ]
