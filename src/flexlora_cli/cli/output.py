"""Everything the CLI shows: rich tables and progress on stderr, or one JSON document on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def console() -> Console:
    width = int(os.environ["FLEXLORA_WIDTH"]) if os.environ.get("FLEXLORA_WIDTH") else None
    return Console(stderr=True, width=width)


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Any]:
    """A progress hook for the library: a bar on an interactive stderr, nothing otherwise."""
    out = console()
    if not enabled or not out.is_terminal:
        yield None
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("", total=None)

        def hook(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=module)

        yield hook


def emit(report: Any, as_json: bool) -> None:
    """One JSON document on stdout for machines, or tables on stderr for people."""
    for note in report.get("notes", []) if isinstance(report, dict) else []:  # stderr in both modes
        console().print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        return
    out = console()
    if isinstance(report, list):
        for item in report:
            out.print(_inspect_table(item))
            if "spectrum" in item:
                out.print(_spectrum_table(item))
        return
    command = report["command"]
    if command in ("merge", "aggregate"):
        out.print(_clients_table(report))
    if command == "split":
        out.print(_split_table(report))
    if command == "merge":
        out.print(f"merged adapter: [bold]{report['output']}[/] (energy kept {report['energy_kept']:.4%})")
        if report.get("dense_file"):
            out.print(f"dense update: {report['dense_file']}")
    if report.get("svd") == "randomized":
        error_text = "not measured" if report.get("randomized_error") is None else f"{report['randomized_error']:.2e}"
        out.print(f"randomized SVD: relative error to the exact truncation {error_text} (worst of the modules checked against the exact SVD)")
    if report.get("global"):
        out.print(f"stacked global adapter: [bold]{report['global']}[/] (FLoRA: no per-client adapters; merge it into the base model)")
    missing = [m for m in report.get("modules", []) if m.get("missing_from")]
    for module in missing[:5]:
        out.print(f"[yellow]note:[/] {module['name']} was not adapted by {', '.join(module['missing_from'])} (zero update there)")
    if len(missing) > 5:
        out.print(f"[yellow]note:[/] {len(missing) - 5} more modules were not adapted by every client")
    for url in report.get("commit_urls", []):
        out.print(f"pushed: {url}")


def error(message: str) -> None:
    console().print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _clients_table(report: dict) -> Table:
    table = Table(title=f"flexlora {report['command']}" + (f" ({report['method']})" if report.get("method") else ""))
    table.add_column("client")
    table.add_column("source", overflow="fold")
    table.add_column("weight", justify="right")
    table.add_column("ranks", justify="right")
    table.add_column("modules", justify="right")
    if report["command"] == "aggregate":
        table.add_column("output ranks", justify="right")
        table.add_column("energy kept", justify="right")
        table.add_column("output", overflow="fold")
    for client in report["clients"]:
        row = [client["name"], client["source"], f"{client['weight']:.4f}", _ranks(client["ranks"]), str(client["modules"])]
        if report["command"] == "aggregate":
            row += [_ranks(client.get("output_ranks", [])), _share(client.get("energy_kept")), client.get("output", "")]
        table.add_row(*row)
    return table


def _split_table(report: dict) -> Table:
    table = Table(title=f"flexlora split of {report['source']}")
    table.add_column("rank", justify="right")
    table.add_column("energy kept", justify="right")
    table.add_column("adapter")
    for rank, folder in report["adapters"].items():
        table.add_row(rank, _share(report["energy_kept"][rank]), folder)
    return table


def _inspect_table(item: dict) -> Table:
    table = Table(title=item["source"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    fields = ["base_model", "peft_type", "ranks", "alphas", "scalings", "use_rslora", "fan_in_fan_out", "target_modules", "modules", "modules_to_save", "dtype", "parameters", "file_size"]
    for field in fields:
        value = item[field]
        if field == "file_size":
            value = f"{value:,} bytes"
        elif field == "parameters":
            value = f"{value:,}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "-"
        table.add_row(field, str(value))
    return table


def _spectrum_table(item: dict) -> Table:
    spectrum = item["spectrum"]
    ranks = list(spectrum["overall"])
    table = Table(title=f"energy kept by rank: {item['source']}")
    table.add_column("module")
    for rank in ranks:
        table.add_column(f"r={rank}", justify="right")
    for name, shares in spectrum["modules"].items():
        table.add_row(name, *(_share(shares[r]) for r in ranks))
    table.add_row("[bold]overall", *(f"[bold]{_share(spectrum['overall'][r])}" for r in ranks))
    return table


def _ranks(ranks: list) -> str:
    return ",".join(str(r) for r in ranks)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
