"""`inspect --plot FILE.png`: each module's spectrum and energy curve, as one picture (matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora_cli.errors import OptionError

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_target(path: Path) -> None:
    """Refuse, before any work, a plot that cannot be written (wrong suffix, missing matplotlib, no folder)."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise OptionError.argument("plot", f"{path} must end in {', '.join(PLOT_SUFFIXES)}")
    if not path.parent.resolve().is_dir():
        raise OptionError.argument("plot", f"{path.parent} is not a folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError.argument("plot", "needs matplotlib", hint="pip install 'flexlora-cli[plot]'") from None


def write_plot(path: Path, reports: Sequence[dict[str, Any]]) -> None:
    """One row per adapter: singular values per module (log scale), and the share of each module's energy
    kept by rank, with the requested ranks marked. `reports` are inspect's, with `spectrum.values`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(reports), 2, figsize=(12, 4 * len(reports)), squeeze=False)
    for (values_ax, energy_ax), report in zip(axes, reports):
        spectrum = report["spectrum"]
        ranks = [int(r) for r in spectrum["overall"]]
        for name, values in spectrum["values"].items():
            squares = [v * v for v in values]
            total = sum(squares) or 1.0
            kept, running = [], 0.0
            for square in squares:
                running += square
                kept.append(running / total)
            steps = range(1, len(values) + 1)
            values_ax.semilogy(steps, [max(v, 1e-30) for v in values], linewidth=0.8, label=name)
            energy_ax.plot(steps, kept, linewidth=0.8)
        for rank in ranks:
            energy_ax.axvline(rank, color="gray", linestyle=":", linewidth=0.8)
            energy_ax.text(rank, 0.02, f" r={rank}: {spectrum['overall'][str(rank)]:.1%}", fontsize=7, rotation=90, va="bottom")
        values_ax.set(title=f"{report['name']}: singular values per module", xlabel="component", ylabel="singular value (scaled delta)")
        energy_ax.set(title=f"{report['name']}: energy kept by rank", xlabel="rank", ylabel="share of squared Frobenius norm", ylim=(0, 1.02))
        if len(spectrum["values"]) <= 12:
            values_ax.legend(fontsize=6)
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial{path.suffix}")  # a whole picture or none
    try:
        figure.savefig(partial, dpi=110)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(figure)
