"""Everything the CLI shows: rich tables and progress on stderr, or one JSON document on stdout.

Text from users (client and folder names, sources, module names, repo ids, URLs) is escaped before rich sees
it: a client named `[/]` or `[bold]x` prints literally, never as markup (an unbalanced tag would crash).
"""

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
    # emoji=False: ":smile:" in a folder name is text, not an emoji code.
    return Console(stderr=True, width=width, emoji=False)


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Any]:
    """A progress hook for the library: a bar on an interactive stderr, nothing otherwise."""
    out = console()
    if not enabled or not out.is_terminal:
        yield None
        return
    columns = (TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("", total=None)

        def hook(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=escape(module))  # rendered as markup

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
    if command == "fold":
        out.print(_fold_table(report))
        return
    if command in ("merge", "aggregate"):
        out.print(_clients_table(report))
    if command == "aggregate":
        _print_trust(out, report)
    if command == "split":
        out.print(_split_table(report))
    if command == "merge":
        out.print(f"merged adapter: [bold]{escape(str(report['output']))}[/] (energy kept {report['energy_kept']:.4%})")
        if report.get("dense_file"):
            out.print(f"dense update: {escape(str(report['dense_file']))}")
    if report.get("svd") == "randomized":
        error_text = "not measured" if report.get("randomized_error") is None else f"{report['randomized_error']:.2e}"
        out.print(f"randomized SVD: relative error to the exact truncation {error_text} (worst of the modules checked against the exact SVD)")
    if report.get("global"):
        kept = report.get("global_energy_kept")
        energy = f", energy kept {kept:.4%}" if kept is not None else ""
        ranks = _ranks(sorted(set(report.get("global_ranks", {}).values())))
        out.print(f"global adapter ({escape(report['method'])}): [bold]{escape(str(report['global']))}[/] (ranks {ranks}{energy})")
    missing = [m for m in report.get("modules", []) if m.get("missing_from")]
    for module in missing[:5]:
        clients = escape(", ".join(module["missing_from"]))
        out.print(f"[yellow]note:[/] {escape(module['name'])} was not adapted by {clients} (zero update there)")
    if len(missing) > 5:
        out.print(f"[yellow]note:[/] {len(missing) - 5} more modules were not adapted by every client")
    for url in report.get("commit_urls", []):
        out.print(f"pushed: {escape(str(url))}")


def error(message: str) -> None:
    console().print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _clients_table(report: dict) -> Table:
    table = Table(title=escape(f"flexlora {report['command']}" + (f" ({report['method']})" if report.get("method") else "")))
    table.add_column("client")
    table.add_column("source", overflow="fold")
    table.add_column("weight", justify="right")
    table.add_column("ranks", justify="right")
    table.add_column("modules", justify="right")
    aggregate = report["command"] == "aggregate"
    if aggregate:
        table.add_column("update norm", justify="right")
        if report.get("clip") is not None:
            table.add_column("clip", justify="right")
        if report.get("screen"):
            table.add_column("screen z", justify="right")
        table.add_column("output ranks", justify="right")
        table.add_column("energy kept", justify="right")
        table.add_column("output", overflow="fold")
    for client in report["clients"]:
        row = [client["name"], client["source"], f"{client['weight']:.4f}", _ranks(client["ranks"]), str(client["modules"])]
        if aggregate:
            row += [_number(client.get("update_norm"))]
            row += [_clip(client)] if report.get("clip") is not None else []
            row += [_screen(client)] if report.get("screen") else []
            row += [_ranks(client.get("output_ranks", [])), _share(client.get("energy_kept")), client.get("output", "")]
        table.add_row(*_cells(row))
    return table


def _print_trust(out: Console, report: dict) -> None:
    """Who was clipped, and the privacy guarantee of a DP round."""
    clipped = [c for c in report["clients"] if c.get("clipped")]
    if report.get("clip") is not None:
        names = ", ".join(f"{c['name']} x{c['clip_factor']:.3g}" for c in clipped) or "none"
        out.print(f"clipped to norm {report['clip']:g}: {escape(names)}", highlight=False)
    privacy = report.get("privacy")
    if privacy:
        ledger = f"; ledger {privacy['ledger']}" + (" (new)" if privacy.get("new_ledger") else "") if privacy.get("ledger") else "; no ledger: this round only"
        out.print(
            f"differential privacy: epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']:g} over {privacy['rounds']} round(s) "
            f"(noise multiplier {privacy['noise_multiplier']:g}, clip {privacy['clip']:g}, sampling rate {privacy['sampling_rate']:g}; "
            f"{privacy['accountant']}{ledger})", highlight=False, markup=False, soft_wrap=True,
        )


def _fold_table(report: dict) -> Table:
    table = Table(title=escape(f"flexlora fold of {report['adapter']} into {report['base']}"))
    table.add_column("shard")
    table.add_column("tensors", justify="right")
    table.add_column("changed", justify="right")
    for shard in report["shards"]:
        table.add_row(*_cells([shard["file"], str(shard["tensors"]), str(len(shard["edited"]))]))
    table.caption = escape(
        f"{len(report['modules'])} modules folded, {len(report['modules_to_save'])} tensors replaced, "
        f"{len(report['copied'])} files copied -> {report['output']}"
    )
    return table


def _split_table(report: dict) -> Table:
    table = Table(title=escape(f"flexlora split of {report['source']}"))
    table.add_column("rank", justify="right")
    table.add_column("energy kept", justify="right")
    table.add_column("adapter")
    for rank, folder in report["adapters"].items():
        table.add_row(*_cells([rank, _share(report["energy_kept"][rank]), folder]))
    return table


def _inspect_table(item: dict) -> Table:
    table = Table(title=escape(str(item["source"])), show_header=False)
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
        table.add_row(*_cells([field, value]))
    return table


def _spectrum_table(item: dict) -> Table:
    spectrum = item["spectrum"]
    ranks = list(spectrum["overall"])
    table = Table(title=escape(f"energy kept by rank: {item['source']}"))
    table.add_column("module")
    for rank in ranks:
        table.add_column(f"r={rank}", justify="right")
    for name, shares in spectrum["modules"].items():
        table.add_row(*_cells([name, *(_share(shares[r]) for r in ranks)]))
    table.add_row("[bold]overall", *(f"[bold]{_share(spectrum['overall'][r])}" for r in ranks))
    return table


def _cells(values: list) -> list[str]:
    """Table cells as literal text: rich reads a str cell as markup."""
    return [escape(str(value)) for value in values]


def _ranks(ranks: list) -> str:
    return ",".join(str(r) for r in ranks)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _clip(client: dict) -> str:
    return f"x{client['clip_factor']:.3g}" if client.get("clipped") else "-"


def _screen(client: dict) -> str:
    score = client.get("screen_score")
    text = "-" if score is None else f"{score:.1f}"
    return text + " (left out)" if client.get("screened") else text


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
