"""The `flexlora` command: parse, call the library, print. No math here.

torch and peft are imported inside the commands so that `flexlora --help` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from flexlora_cli.cli.output import emit, error, progress_bar

app = typer.Typer(
    name="flexlora",
    help=(
        "Federated LoRA aggregation across heterogeneous client ranks (FlexLoRA, NeurIPS 2024).\n\n"
        "Clients train LoRA adapters at the rank they can afford; the server merges them into the exact "
        "weighted update and hands each client back its best rank-r approximation.\n\n"
        "Example round:  flexlora aggregate alice/ bob/ carol/ --num-samples 120,300,80 -o round-2/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Options shared by several commands, defined once.
Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder.", show_default=False)]
Weights = Annotated[Optional[str], typer.Option("--weights", help="Client weights, comma-separated, in input order (normalized to sum 1).")]
NumSamples = Annotated[Optional[str], typer.Option("--num-samples", help="Client sample counts, comma-separated; weights are proportional to them.")]
Precision = Annotated[str, typer.Option("--precision", help="Compute precision: fp32 or fp64.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Output dtype (float32, bfloat16, float16); default: the inputs' dtype.")]
Balanced = Annotated[bool, typer.Option("--balanced", help="Put sqrt(S) on both factors; by default S goes into B, as in the paper.")]
SvdMode = Annotated[str, typer.Option("--svd", help="exact, or randomized: only the top components the command keeps, by a randomized range finder (faster with many clients; the error it cost, measured on a few modules, is reported).")]
SvdPath = Annotated[str, typer.Option("--svd-path", help="How each module's SVD is computed: auto (a cost model picks the fastest), stacked, dense or incremental. For benchmarks and experts.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
AllowBaseMismatch = Annotated[bool, typer.Option("--allow-base-mismatch", help="Merge adapters whose configs name different base models.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Token = Annotated[Optional[str], typer.Option("--token", help="Hugging Face token for Hub inputs and pushes (default: HF_TOKEN, or the saved `hf auth login`). Never printed; prefer HF_TOKEN, since command lines are visible to other users.", show_default=False)]
PushToHub = Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the output: org/name (or hf://org/name@branch/folder), several adapters in subfolders of one commit; or a template giving each its own repo, org/client-{name} (aggregate) or org/global-r{rank} (split).", show_default=False)]
Private = Annotated[bool, typer.Option("--private", help="Create new repos of --push-to-hub as private (existing repos keep their visibility).")]
Revision = Annotated[Optional[str], typer.Option("--revision", "--branch", help="Branch for --push-to-hub (created if missing; default main).", show_default=False)]
CommitMessage = Annotated[Optional[str], typer.Option("--commit-message", help="Commit message for --push-to-hub.", show_default=False)]
CreatePr = Annotated[bool, typer.Option("--create-pr", help="With --push-to-hub, open a pull request instead of committing to the branch.")]


def _numbers(text: str | None, option: str, kind=float) -> list | None:
    if text is None:
        return None
    from flexlora_cli.errors import OptionError

    try:
        values = [kind(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if not values:
        raise OptionError(option, f"expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}")
    return values


def _run(debug: bool, call):
    """Run a library call; FlexLoraError becomes one line on stderr and exit code 2."""
    from flexlora_cli.errors import FlexLoraError

    try:
        return call()
    except FlexLoraError as failure:
        if debug or os.environ.get("FLEXLORA_DEBUG"):
            raise
        error(failure.message)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        error("interrupted; nothing partial was written (outputs are all-or-nothing)")
        raise typer.Exit(130) from None


def _with_hub(command: str, verb, token, push_to_hub, private, revision, commit_message, create_pr):
    """Check the push target first, run the verb (Hub inputs read with `token`), then push what it wrote."""
    from flexlora_cli import api
    from flexlora_cli.adapters.hub import use_token
    from flexlora_cli.errors import OptionError

    if push_to_hub:
        api.check_push(command, push_to_hub, revision=revision, create_pr=create_pr)
    else:
        for flag, given in (("--private", private), ("--revision", revision), ("--commit-message", commit_message), ("--create-pr", create_pr)):
            if given:
                raise OptionError(flag, "only applies with --push-to-hub")
    with use_token(token):
        report = verb()
    if push_to_hub:
        api.push_outputs(
            report, push_to_hub, private=private, revision=revision, commit_message=commit_message,
            create_pr=create_pr, token=token,
        )
    return report


def _compute(precision: str, device: str, dtype: str | None, balanced: bool, svd: str = "exact", svd_path: str = "auto"):
    from flexlora_cli.engine import Compute

    return Compute(precision=precision, device=device, dtype=dtype, balanced=balanced, svd=svd, path=svd_path)


@app.command()
def merge(
    adapters: Annotated[list[str], typer.Argument(help="Client adapters: folders or Hub repos (org/name\\[@rev], hf://org/name\\[@rev]/folder); NAME=... names a client.", show_default=False)],
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Truncate every module to this rank instead of keeping the exact rank.")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="Also write the full-size update per module to OUTPUT/flexlora_delta.safetensors.")] = False,
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    svd: SvdMode = "exact",
    svd_path: SvdPath = "auto",
    overwrite: Overwrite = False,
    allow_base_mismatch: AllowBaseMismatch = False,
    token: Token = None,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
    commit_message: CommitMessage = None,
    create_pr: CreatePr = False,
    json_: Json = False,
    debug: Debug = False,
):
    """Merge client adapters into ONE adapter whose delta is the exact weighted update.

    Each module gets the numerical rank of sum_i w_i s_i B_i A_i (recorded with rank_pattern),
    with scaling 1, so PEFT applies exactly the merged update.

    Examples:

        flexlora merge alice/ bob/ -o merged/

        flexlora merge a/ b/ c/ --num-samples 100,250,50 --rank 64 --dense -o merged/
    """

    def verb():
        from flexlora_cli import api

        with progress_bar("merging", not json_) as hook:
            return api.merge(
                adapters, output, weights=_numbers(weights, "--weights"), num_samples=_numbers(num_samples, "--num-samples"),
                rank=rank, dense=dense, compute=_compute(precision, device, dtype, balanced, svd, svd_path), overwrite=overwrite,
                allow_base_mismatch=allow_base_mismatch, progress=hook,
            )

    emit(_run(debug, lambda: _with_hub("merge", verb, token, push_to_hub, private, revision, commit_message, create_pr)), json_)


@app.command()
def split(
    merged: Annotated[str, typer.Argument(help="A LoRA adapter folder (e.g. from `merge`), a Hub reference (org/name\\[@rev], hf://org/name\\[@rev]/folder), or a `merge --dense` .safetensors file.", show_default=False)],
    ranks: Annotated[str, typer.Option("--ranks", help="Comma-separated ranks, e.g. 8,16,64.", show_default=False)],
    output: Output,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="lora_alpha of the outputs (default: the rank, i.e. scaling 1).")] = None,
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    overwrite: Overwrite = False,
    token: Token = None,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
    commit_message: CommitMessage = None,
    create_pr: CreatePr = False,
    json_: Json = False,
    debug: Debug = False,
):
    """SVD-truncate an adapter's update into one adapter per rank: OUTPUT/rank-<r>/.

    Each is the best rank-r approximation (Eckart-Young) of the input's delta.

    Examples:

        flexlora split merged/ --ranks 8,16,64 -o per-rank/

        flexlora split merged/flexlora_delta.safetensors --ranks 32 --alpha 64 -o r32/
    """

    def verb():
        from flexlora_cli import api

        with progress_bar("splitting", not json_) as hook:
            return api.split(
                merged, _numbers(ranks, "--ranks", int), output, alpha=alpha,
                compute=_compute(precision, device, dtype, balanced), overwrite=overwrite, progress=hook,
            )

    emit(_run(debug, lambda: _with_hub("split", verb, token, push_to_hub, private, revision, commit_message, create_pr)), json_)


@app.command()
def aggregate(
    clients: Annotated[list[str], typer.Argument(help="Client adapters: folders or Hub repos (org/name\\[@rev], hf://org/name\\[@rev]/folder); NAME=... names the client's output folder.", show_default=False)],
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Override the clients' ranks: one rank for all, or one per client in order.")] = None,
    method: Annotated[str, typer.Option("--method", help=(
        "flexlora: exact weighted update, SVD-truncated to each client's rank. "
        "hetlora: zero-pad A and B to the largest rank, average each, give client i the first r_i. "
        "fedavg: average A and B (all clients must share one rank). "
        "flora: write one stacked global adapter OUTPUT/global/ of rank sum r_i (FLoRA has no per-client redistribution)."
    ))] = "flexlora",
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    svd: SvdMode = "exact",
    svd_path: SvdPath = "auto",
    overwrite: Overwrite = False,
    allow_base_mismatch: AllowBaseMismatch = False,
    token: Token = None,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
    commit_message: CommitMessage = None,
    create_pr: CreatePr = False,
    json_: Json = False,
    debug: Debug = False,
):
    """One FlexLoRA server round: merge all clients, write OUTPUT/<client>/ at each client's own rank.

    Every output keeps its client's config (alpha, rsLoRA, rank_pattern, target modules), ready
    for the client's next local round. --method picks a baseline to compare with: hetlora and
    fedavg average the raw factors, and PEFT applies each client's own alpha/r to them, so give
    clients one shared scaling; flora writes only OUTPUT/global/ (scaling 1), to be merged into
    the base model, since FLoRA does not hand clients their own adapters back.

    Examples:

        flexlora aggregate round-1/alice round-1/bob round-1/carol -o round-2/

        flexlora aggregate alice=uploads/a1 bob=uploads/b7 --num-samples 1200,300 -o next/

        flexlora aggregate round-1/* --method hetlora -o round-2/
    """

    def verb():
        from flexlora_cli import api

        with progress_bar("aggregating", not json_) as hook:
            return api.aggregate(
                clients, output, weights=_numbers(weights, "--weights"), num_samples=_numbers(num_samples, "--num-samples"),
                ranks=_numbers(ranks, "--ranks", int), compute=_compute(precision, device, dtype, balanced, svd, svd_path),
                overwrite=overwrite, allow_base_mismatch=allow_base_mismatch, progress=hook, method=method,
            )

    emit(_run(debug, lambda: _with_hub("aggregate", verb, token, push_to_hub, private, revision, commit_message, create_pr)), json_)


@app.command()
def inspect(
    adapters: Annotated[list[str], typer.Argument(help="Adapter folders or Hub references (org/name\\[@rev], hf://org/name\\[@rev]/folder).", show_default=False)],
    spectrum: Annotated[Optional[str], typer.Option("--spectrum", help="Comma-separated ranks: show the share of spectral energy kept at each.")] = None,
    token: Token = None,
    json_: Json = False,
    debug: Debug = False,
):
    """Describe adapters: base model, ranks, alpha, scaling, targets, dtype, size.

    Examples:

        flexlora inspect round-2/alice

        flexlora inspect merged/ --spectrum 8,16,64 --json
    """

    def verb():
        from flexlora_cli import api

        with progress_bar("inspecting", not json_) as hook:
            return api.inspect(adapters, _numbers(spectrum, "--spectrum", int), progress=hook)

    def call():
        from flexlora_cli.adapters.hub import use_token

        with use_token(token):
            return verb()

    emit(_run(debug, call), json_)


def main() -> None:
    import signal

    # A kill (SIGTERM, as CI runners and schedulers send) unwinds like Ctrl-C, so the output's
    # temporary folder is removed and the old state stays in place.
    signal.signal(signal.SIGTERM, _interrupt)
    app()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
