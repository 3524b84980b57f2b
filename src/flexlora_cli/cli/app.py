"""The `flexlora` command: parse, call the library, print. No math here.

torch is imported inside the commands so that `flexlora --help` is instant; choices are typed
(flexlora_cli.choices), so `--help` lists them and typer refuses others before any work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flexlora_cli.choices import MethodName, OutputDtype, Precision, SvdMode, SvdPath
from flexlora_cli.cli.output import emit, error, progress_bar
from flexlora_cli.methods.registry import METHODS

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
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="Compute precision.")]
Device = Annotated[str, typer.Option("--device", metavar="[auto|cpu|cuda|cuda:N]", help="Where to compute.")]
Dtype = Annotated[Optional[OutputDtype], typer.Option("--dtype", help="Output dtype; default: the inputs' dtype.", show_default=False)]
Balanced = Annotated[bool, typer.Option("--balanced", help="Put sqrt(S) on both factors; by default S goes into B, as in the paper.")]
SvdModeOpt = Annotated[SvdMode, typer.Option("--svd", help="exact, or randomized: only the top components the command keeps, by a randomized range finder (faster with many clients; the error it cost, measured on a few modules, is reported).")]
SvdPathOpt = Annotated[SvdPath, typer.Option("--svd-path", help="How each module's SVD is computed: auto (a cost model picks the fastest), stacked, dense or incremental. For benchmarks and experts.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if flexlora wrote it before (it holds flexlora_manifest.json) or it is empty; anything else is refused.")]
AllowBaseMismatch = Annotated[bool, typer.Option("--allow-base-mismatch", help="Merge adapters whose configs name different base models.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Token = Annotated[Optional[str], typer.Option("--token", help="Hugging Face token for Hub inputs and pushes (default: HF_TOKEN, or the saved `hf auth login`). Never printed; prefer HF_TOKEN, since command lines are visible to other users.", show_default=False)]
PushToHub = Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the output: org/name (or hf://org/name@branch/folder), several adapters in subfolders of one commit; or a template giving each its own repo, org/client-{name} (aggregate) or org/global-r{rank} (split).", show_default=False)]
Private = Annotated[bool, typer.Option("--private", help="Create new repos of --push-to-hub as private (existing repos keep their visibility).")]
Revision = Annotated[Optional[str], typer.Option("--revision", "--branch", help="Branch for --push-to-hub (created if missing; default main).", show_default=False)]
CommitMessage = Annotated[Optional[str], typer.Option("--commit-message", help="Commit message for --push-to-hub.", show_default=False)]
CreatePr = Annotated[bool, typer.Option("--create-pr", help="With --push-to-hub, open a pull request instead of committing to the branch.")]
Adapters = Annotated[list[str], typer.Argument(help="Client adapters: folders or Hub repos (org/name\\[@rev], hf://org/name\\[@rev]/folder); NAME=... names a client.", show_default=False)]
Energy = Annotated[Optional[float], typer.Option("--energy", help="Keep, per module, the smallest rank whose singular values hold at least this share of its squared Frobenius norm (e.g. 0.9); per-module ranks go in rank_pattern.", show_default=False)]

def _version(shown: bool) -> None:
    if shown:
        from flexlora_cli import __version__

        print(f"flexlora {__version__}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """Federated LoRA aggregation across heterogeneous client ranks (FlexLoRA, NeurIPS 2024)."""


# Library parameters whose flag is not simply --<name with dashes>.
_FLAGS = {"global_energy": "--energy", "global_": "--global"}


def _numbers(text: str | None, option: str, kind=float) -> list | None:
    if text is None:
        return None
    from flexlora_cli.errors import OptionError

    try:
        values = [kind(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if not values:
        raise OptionError.argument(option, f"expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}")
    return values


def _run(debug: bool, call):
    """Run a library call; FlexLoraError becomes one line on stderr and exit code 2."""
    from flexlora_cli.errors import FlexLoraError, OptionError

    try:
        return call()
    except FlexLoraError as failure:
        if debug or os.environ.get("FLEXLORA_DEBUG"):
            raise
        if isinstance(failure, OptionError) and failure.option:
            failure = failure.renamed(_FLAGS.get(failure.option, "--" + failure.option.replace("_", "-")))
        error(failure.message)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        error("interrupted; nothing was written (outputs are all-or-nothing)")
        raise typer.Exit(130) from None


def _push(push_to_hub, private, revision, commit_message, create_pr, token):
    """The --push-to-hub settings for a verb, or None; the push options alone are refused."""
    from flexlora_cli.errors import OptionError

    if not push_to_hub:
        for flag, given in (("--private", private), ("--revision", revision), ("--commit-message", commit_message), ("--create-pr", create_pr)):
            if given:
                raise OptionError(flag, "only applies with --push-to-hub")
        return None
    from flexlora_cli.api import Push

    return Push(push_to_hub, private=private, revision=revision, commit_message=commit_message, create_pr=create_pr, token=token)


def _verb(token, label: str, json_: bool, call):
    """Run a verb with Hub inputs read with `token` and a progress bar on an interactive stderr."""
    from flexlora_cli.adapters.hub import use_token

    with use_token(token), progress_bar(label, not json_) as hook:
        return call(hook)


def _privacy(noise, delta, sampling_rate, ledger, seed):
    """The --dp-noise settings, or None; the other --dp-* options and --seed alone are refused."""
    from flexlora_cli.errors import OptionError

    if noise is None:
        for flag, given in (("--dp-delta", delta), ("--dp-sampling-rate", sampling_rate), ("--dp-ledger", ledger), ("--seed", seed)):
            if given is not None:
                raise OptionError(flag, "only applies with --dp-noise")
        return None
    from flexlora_cli.privacy import DEFAULT_DELTA, Privacy

    return Privacy(noise, delta=DEFAULT_DELTA if delta is None else delta, sampling_rate=1.0 if sampling_rate is None else sampling_rate,
                   ledger=ledger, seed=seed)


def _compute(precision, device, dtype, balanced, svd=SvdMode.exact, svd_path=SvdPath.auto):
    from flexlora_cli.compute import Compute

    return Compute(precision=precision, device=device, dtype=dtype, balanced=balanced, svd=svd, path=svd_path)


@app.command()
def merge(
    adapters: Adapters,
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Truncate every module to this rank instead of keeping the exact rank.")] = None,
    energy: Energy = None,
    dense: Annotated[bool, typer.Option("--dense", help="Also write the full-size update per module to OUTPUT/flexlora_delta.safetensors.")] = False,
    precision: PrecisionOpt = Precision.fp32,
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    svd: SvdModeOpt = SvdMode.exact,
    svd_path: SvdPathOpt = SvdPath.auto,
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

        flexlora merge a/ b/ c/ --energy 0.95 -o merged-95/
    """

    def call():
        from flexlora_cli import api

        push = _push(push_to_hub, private, revision, commit_message, create_pr, token)
        return _verb(token, "merging", json_, lambda hook: api.merge(
            adapters, output, weights=_numbers(weights, "weights"), num_samples=_numbers(num_samples, "num_samples"),
            rank=rank, energy=energy, dense=dense, compute=_compute(precision, device, dtype, balanced, svd, svd_path),
            overwrite=overwrite, allow_base_mismatch=allow_base_mismatch, progress=hook, push=push,
        ))

    emit(_run(debug, call), json_)


@app.command()
def split(
    merged: Annotated[str, typer.Argument(help="A LoRA adapter folder (e.g. from `merge`), a Hub reference (org/name\\[@rev], hf://org/name\\[@rev]/folder), or a `merge --dense` .safetensors file.", show_default=False)],
    output: Output,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Comma-separated ranks, e.g. 8,16,64: OUTPUT/rank-<r>/ each.", show_default=False)] = None,
    energy: Annotated[Optional[str], typer.Option("--energy", help="Comma-separated energy shares, e.g. 0.9,0.99: OUTPUT/energy-<E>/ each, per module the smallest rank keeping that share of its squared Frobenius norm.", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="lora_alpha of the outputs (default: the rank, i.e. scaling 1).")] = None,
    precision: PrecisionOpt = Precision.fp32,
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
    """SVD-truncate an adapter's update into one adapter per rank (OUTPUT/rank-<r>/) or energy share
    (OUTPUT/energy-<E>/).

    Each is the best approximation (Eckart-Young) of the input's delta at that rank.

    Examples:

        flexlora split merged/ --ranks 8,16,64 -o per-rank/

        flexlora split merged/ --energy 0.9 -o kept-90/

        flexlora split merged/flexlora_delta.safetensors --ranks 32 --alpha 64 -o r32/
    """

    def call():
        from flexlora_cli import api

        push = _push(push_to_hub, private, revision, commit_message, create_pr, token)
        return _verb(token, "splitting", json_, lambda hook: api.split(
            merged, _numbers(ranks, "ranks", int) or [], output, energy=_numbers(energy, "energy") or [], alpha=alpha,
            compute=_compute(precision, device, dtype, balanced), overwrite=overwrite, progress=hook, push=push,
        ))

    emit(_run(debug, call), json_)


_METHOD_HELP = " ".join(f"{m.name}: {m.rule}." for m in METHODS.values())


@app.command()
def aggregate(
    clients: Annotated[list[str], typer.Argument(help="Client adapters: folders or Hub repos (org/name\\[@rev], hf://org/name\\[@rev]/folder); NAME=... names the client's output folder (letters, digits, . _ -).", show_default=False)],
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Override the clients' ranks: one rank for all, or one per client in order.")] = None,
    method: Annotated[MethodName, typer.Option("--method", help=_METHOD_HELP)] = MethodName("flexlora"),
    global_: Annotated[bool, typer.Option("--global", help="Also write OUTPUT/global/: the method's global result (flexlora: the exact merged update, as `merge` writes it); a client that missed the round starts from it.")] = False,
    energy: Annotated[Optional[float], typer.Option("--energy", help="With the global output (implies --global): keep per module the smallest rank holding this share of its squared Frobenius norm.", show_default=False)] = None,
    ridge: Annotated[Optional[float], typer.Option("--ridge", help="lora-fair: the ridge of its least-squares correction, relative to tr(A A^T)/r.", show_default=False)] = None,
    clip: Annotated[Optional[float], typer.Option("--clip", metavar="C", help="Scale each client's whole update (all modules) by min(1, C / ||dW||_F) before weighting; the table shows who was clipped.", show_default=False)] = None,
    screen: Annotated[bool, typer.Option("--screen", help="Leave out of the round (with a warning) a client whose update norm per unit of rank, ||dW||_F / sqrt(r), is an outlier by the per-rank log-MAD rule (see the README); it still receives the round's result.")] = False,
    screen_refuse: Annotated[bool, typer.Option("--screen-refuse", help="Like --screen, but refuse the whole round (exit 2) if any client is flagged.")] = False,
    screen_threshold: Annotated[Optional[float], typer.Option("--screen-threshold", metavar="T", help="Robust standard deviations (log scale, at least ln 2 each) above the median at which --screen flags a client; default 3.5, i.e. at least ~11x the median per-rank norm.", show_default=False)] = None,
    dp_noise: Annotated[Optional[float], typer.Option("--dp-noise", metavar="SIGMA", help="Differential privacy: add Gaussian noise of std SIGMA * C * max_i w_i to every entry of each module's merged update (needs --clip; weights uniform or --weights; flexlora only; the dense path: slow on big models). Reports (epsilon, delta); needs the dp-accounting package.", show_default=False)] = None,
    dp_delta: Annotated[Optional[float], typer.Option("--dp-delta", help="With --dp-noise: the delta of the (epsilon, delta) reported, in (0, 1); default 1e-5 (choose it below 1 / the number of clients in the federation).", show_default=False)] = None,
    dp_sampling_rate: Annotated[Optional[float], typer.Option("--dp-sampling-rate", metavar="Q", help="With --dp-noise: the probability with which each client of the federation was sampled into this round, independently (default 1: every client, every round).", show_default=False)] = None,
    dp_ledger: Annotated[Optional[Path], typer.Option("--dp-ledger", help="With --dp-noise: the federation's ledger of private rounds (e.g. rounds.json), created on the first round and passed to every round after; epsilon covers all its rounds.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="With --dp-noise: seed the noise, reproducible byte for byte (tests only: whoever knows the seed can remove the noise). Without it the noise comes from the OS's secure source and no seed is kept.", show_default=False)] = None,
    precision: PrecisionOpt = Precision.fp32,
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    svd: SvdModeOpt = SvdMode.exact,
    svd_path: SvdPathOpt = SvdPath.auto,
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
    """One server round: aggregate all clients, write OUTPUT/<client>/ at each client's own rank.

    Every output keeps its client's config (alpha, rsLoRA, rank_pattern, target modules), ready
    for the client's next local round. --method picks the aggregation (see the README's method
    table): hetlora, fedavg and lora-fair average raw factors, so their clients must share one
    scaling alpha/r; flora writes only OUTPUT/global/ (scaling 1), which clients fold into their
    base model (`flexlora fold`).

    Examples:

        flexlora aggregate round-1/alice round-1/bob round-1/carol -o round-2/

        flexlora aggregate alice=uploads/a1 bob=uploads/b7 --num-samples 1200,300 --global -o next/

        flexlora aggregate round-1/* --method hetlora -o round-2/

        flexlora aggregate round-1/* --clip 1.0 --screen -o round-2/

        flexlora aggregate round-1/* --clip 1.0 --dp-noise 1.1 --dp-ledger rounds.json -o round-2/
    """

    def call():
        from flexlora_cli import api

        push = _push(push_to_hub, private, revision, commit_message, create_pr, token)
        options = {"ridge": ridge} if ridge is not None else None
        privacy = _privacy(dp_noise, dp_delta, dp_sampling_rate, dp_ledger, seed)
        screen_mode = "refuse" if screen_refuse else "drop" if screen else None
        return _verb(token, "aggregating", json_, lambda hook: api.aggregate(
            clients, output, weights=_numbers(weights, "weights"), num_samples=_numbers(num_samples, "num_samples"),
            ranks=_numbers(ranks, "ranks", int), method=method, global_=global_, global_energy=energy, method_options=options,
            compute=_compute(precision, device, dtype, balanced, svd, svd_path), overwrite=overwrite,
            allow_base_mismatch=allow_base_mismatch, progress=hook, push=push,
            clip=clip, screen=screen_mode, screen_threshold=screen_threshold, privacy=privacy,
        ))

    emit(_run(debug, call), json_)


@app.command()
def inspect(
    adapters: Annotated[list[str], typer.Argument(help="Adapter folders or Hub references (org/name\\[@rev], hf://org/name\\[@rev]/folder).", show_default=False)],
    spectrum: Annotated[Optional[str], typer.Option("--spectrum", help="Comma-separated ranks: show the share of spectral energy kept at each.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw each module's singular values and energy curve (with the --spectrum ranks marked) into this .png/.svg/.pdf; needs matplotlib.", show_default=False)] = None,
    token: Token = None,
    json_: Json = False,
    debug: Debug = False,
):
    """Describe adapters: base model, ranks, alpha, scaling, targets, dtype, size.

    Examples:

        flexlora inspect round-2/alice

        flexlora inspect merged/ --spectrum 8,16,64 --json

        flexlora inspect merged/ --spectrum 8,64 --plot spectrum.png
    """

    def call():
        from flexlora_cli import api, plot as plots

        if plot is not None:
            plots.check_plot_target(plot)
        ranks = _numbers(spectrum, "spectrum", int)
        reports = _verb(token, "inspecting", json_, lambda hook: api.inspect(adapters, ranks, progress=hook, values=plot is not None))
        if plot is not None:
            plots.write_plot(plot, reports)
            for report in reports:
                report["spectrum"].pop("values")
                if not ranks:
                    report.pop("spectrum")
        return reports

    emit(_run(debug, call), json_)


@app.command()
def fold(
    base: Annotated[str, typer.Argument(help="The base model: a transformers folder (model.safetensors, or shards with model.safetensors.index.json) or a Hub reference (org/name\\[@rev], hf://org/name\\[@rev]/folder).", show_default=False)],
    adapter: Annotated[str, typer.Argument(help="The LoRA adapter to fold in: a folder or a Hub reference (e.g. a FLoRA round's OUT/global).", show_default=False)],
    output: Output,
    overwrite: Overwrite = False,
    allow_base_mismatch: AllowBaseMismatch = False,
    token: Token = None,
    json_: Json = False,
    debug: Debug = False,
):
    """Write the base model with the adapter's update added to every adapted weight, as PEFT's
    merge_and_unload leaves it (Conv1D, embeddings, modules_to_save included), in the base's dtype.

    Shards are streamed one at a time and keep their names and index; the other files are copied.
    FLoRA clients run this every round (fold the stacked global adapter, train a fresh LoRA); it is
    also how a round's global model is served.

    Examples:

        flexlora fold base-model/ round-2/global -o base-round-2/

        flexlora fold org/base-model@main round-2/global -o served/
    """

    def call():
        from flexlora_cli.fold import fold as fold_

        return _verb(token, "folding", json_, lambda hook: fold_(base, adapter, output, overwrite=overwrite, allow_base_mismatch=allow_base_mismatch, progress=hook))

    emit(_run(debug, call), json_)


def main() -> None:
    """The console entry point: typer's app with one-line usage errors, and signals that unwind cleanly."""
    import signal

    # A kill (SIGTERM, as CI runners and schedulers send) unwinds like Ctrl-C, so the output's
    # staging folder is removed and the old state stays in place; once an output is being moved
    # into place, both are ignored so that the run finishes and says so truthfully.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(run())


def run(args: list[str] | None = None) -> int:
    """The `flexlora` command with `args` (default: the command line); returns its exit code.

    Usage errors (no such option, a bad choice, a missing argument) are one line `Error: ...`, exit 2.
    """
    try:
        return app(args=args, prog_name="flexlora", standalone_mode=False) or 0
    except Exception as failure:  # click's exceptions, duck-typed: typer keeps click private
        if type(failure).__name__ == "Abort":  # Ctrl-C outside a verb
            error("interrupted")
            return 130
        if not hasattr(failure, "format_message") or getattr(failure, "exit_code", None) != 2:
            raise
        error(_usage_line(failure))
        return 2


def _usage_line(failure) -> str:
    """A click usage error as one line '<option>: <problem>' (click's text says 'Invalid value for ...')."""
    import re

    text = " ".join(failure.format_message().split())
    for pattern, problem in (
        (r"Invalid value for '([^']+)': (.*)", None),
        (r"Missing option '([^']+)'.*", "is required"),
        (r"Missing argument '([^']+)'.*", "is required"),
        (r"No such option:? '?([^'\s]+)'?\.?(.*)", "no such option"),
    ):
        match = re.fullmatch(pattern, text)
        if match:
            name = match.group(1).split("/")[0].strip().strip("'").rstrip(".")
            detail = match.group(2).strip().strip("()") if match.lastindex and match.lastindex > 1 else ""
            return f"{name}: {problem or detail}" + (f" ({detail})" if problem and detail else "")
    return text


def _interrupt(signum, frame):
    from flexlora_cli.adapters.output import committing

    if committing():
        return  # the output is being moved into place (or is): finish, and exit 0 truthfully
    raise KeyboardInterrupt
