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
Balanced = Annotated[bool, typer.Option("--balanced", help="Put sqrt(S) on both factors instead of S in B (the paper's default).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
AllowBaseMismatch = Annotated[bool, typer.Option("--allow-base-mismatch", help="Merge adapters whose configs name different base models.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


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
        error("interrupted; no output was written")
        raise typer.Exit(130) from None


def _compute(precision: str, device: str, dtype: str | None, balanced: bool):
    from flexlora_cli.engine import Compute

    return Compute(precision=precision, device=device, dtype=dtype, balanced=balanced)


@app.command()
def merge(
    adapters: Annotated[list[str], typer.Argument(help="Client adapter folders (NAME=FOLDER to name a client).", show_default=False)],
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Truncate every module to this rank instead of keeping the exact rank.")] = None,
    dense: Annotated[bool, typer.Option("--dense", help=f"Also write the full-size update per module to OUTPUT/flexlora_delta.safetensors.")] = False,
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    overwrite: Overwrite = False,
    allow_base_mismatch: AllowBaseMismatch = False,
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

    def call():
        from flexlora_cli import api

        with progress_bar("merging", not json_) as hook:
            return api.merge(
                adapters, output, weights=_numbers(weights, "--weights"), num_samples=_numbers(num_samples, "--num-samples"),
                rank=rank, dense=dense, compute=_compute(precision, device, dtype, balanced), overwrite=overwrite,
                allow_base_mismatch=allow_base_mismatch, progress=hook,
            )

    emit(_run(debug, call), json_)


@app.command()
def split(
    merged: Annotated[str, typer.Argument(help="A LoRA adapter folder (e.g. from `merge`) or a `merge --dense` .safetensors file.", show_default=False)],
    ranks: Annotated[str, typer.Option("--ranks", help="Comma-separated ranks, e.g. 8,16,64.", show_default=False)],
    output: Output,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="lora_alpha of the outputs (default: the rank, i.e. scaling 1).")] = None,
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    overwrite: Overwrite = False,
    json_: Json = False,
    debug: Debug = False,
):
    """SVD-truncate an adapter's update into one adapter per rank: OUTPUT/rank-<r>/.

    Each is the best rank-r approximation (Eckart-Young) of the input's delta.

    Examples:

        flexlora split merged/ --ranks 8,16,64 -o per-rank/

        flexlora split merged/flexlora_delta.safetensors --ranks 32 --alpha 64 -o r32/
    """

    def call():
        from flexlora_cli import api

        with progress_bar("splitting", not json_) as hook:
            return api.split(
                merged, _numbers(ranks, "--ranks", int), output, alpha=alpha,
                compute=_compute(precision, device, dtype, balanced), overwrite=overwrite, progress=hook,
            )

    emit(_run(debug, call), json_)


@app.command()
def aggregate(
    clients: Annotated[list[str], typer.Argument(help="Client adapter folders; NAME=FOLDER names the client's output folder.", show_default=False)],
    output: Output,
    weights: Weights = None,
    num_samples: NumSamples = None,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Override the clients' ranks: one rank for all, or one per client in order.")] = None,
    precision: Precision = "fp32",
    device: Device = "auto",
    dtype: Dtype = None,
    balanced: Balanced = False,
    overwrite: Overwrite = False,
    allow_base_mismatch: AllowBaseMismatch = False,
    json_: Json = False,
    debug: Debug = False,
):
    """One FlexLoRA server round: merge all clients, write OUTPUT/<client>/ at each client's own rank.

    Every output keeps its client's config (alpha, rsLoRA, rank_pattern, target modules), ready
    for the client's next local round.

    Examples:

        flexlora aggregate round-1/alice round-1/bob round-1/carol -o round-2/

        flexlora aggregate alice=uploads/a1 bob=uploads/b7 --num-samples 1200,300 -o next/
    """

    def call():
        from flexlora_cli import api

        with progress_bar("aggregating", not json_) as hook:
            return api.aggregate(
                clients, output, weights=_numbers(weights, "--weights"), num_samples=_numbers(num_samples, "--num-samples"),
                ranks=_numbers(ranks, "--ranks", int), compute=_compute(precision, device, dtype, balanced),
                overwrite=overwrite, allow_base_mismatch=allow_base_mismatch, progress=hook,
            )

    emit(_run(debug, call), json_)


@app.command()
def inspect(
    adapters: Annotated[list[str], typer.Argument(help="Adapter folders.", show_default=False)],
    spectrum: Annotated[Optional[str], typer.Option("--spectrum", help="Comma-separated ranks: show the share of spectral energy kept at each.")] = None,
    json_: Json = False,
    debug: Debug = False,
):
    """Describe adapters: base model, ranks, alpha, scaling, targets, dtype, size.

    Examples:

        flexlora inspect round-2/alice

        flexlora inspect merged/ --spectrum 8,16,64 --json
    """

    def call():
        from flexlora_cli import api

        with progress_bar("inspecting", not json_) as hook:
            return api.inspect(adapters, _numbers(spectrum, "--spectrum", int), progress=hook)

    emit(_run(debug, call), json_)


def main() -> None:
    app()
