"""Tables and plots from results.json, and nothing else: every number shown is computed here from that file.

    python examples/federated_minilm/report.py results/results.json            # rewrite results.md and the plots
    python examples/federated_minilm/report.py results/results.json --readme README.md --block default

Intervals are 95% percentile intervals of a two-level bootstrap: resample the seeds (each seed redraws
the tasks, the split, the client ranks and who takes part when), then within each drawn seed resample
its test items. Items are never pooled across seeds. A paired difference resamples the per-item
differences of two methods on the same seed and items.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np

REPLICATES = 4000
HEADLINE = "test"  # unseen tasks, scored among the unseen tasks' labels
METRICS = {
    "test": "unseen tasks",
    "test_all": "unseen tasks, among all labels",
    "seen": "clients' tasks (held-out items)",
}
REFERENCE = "flexlora"
ORDER = ("flexlora", "flexlora-balanced", "flexlora-rmin", "raflora", "hetlora", "lora-fair", "flora", "fedavg-rmin", "fedavg-rmax",
         "local", "centralised", "flexlora-dp-s0.03", "flexlora-dp-s0.1", "flexlora-dp-s0.3", "flexlora-dp-s1")  # how tables and legends list the methods  # fmt: skip


def bootstrap(per_seed: list[np.ndarray], replicates: int = REPLICATES, key: str = "") -> tuple[float, float, float]:
    """(mean over seeds of the per-seed item means, 2.5% and 97.5% points of the two-level bootstrap)."""
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    n = len(per_seed)
    point = float(np.mean([x.mean() for x in per_seed]))
    # Each seed's item-resampled means, drawn independently for every (replicate, slot) it may fill.
    resampled = np.stack([x[rng.integers(0, len(x), (replicates, n, len(x)))].mean(axis=2) for x in per_seed])  # seed x rep x slot
    drawn = rng.integers(0, n, (replicates, n))
    values = resampled[drawn, np.arange(replicates)[:, None], np.arange(n)[None, :]].mean(axis=1)
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)


def final_scores(results: dict, distribution: str, variant: str, metric: str) -> dict[int, np.ndarray]:
    """seed -> per-item scores of the run each seed reports (the chosen learning rate)."""
    return {
        run["seed"]: np.asarray(run["final"][metric], dtype=float)
        for run in results["runs"]
        if run["variant"] == variant and not run["tuning_only"] and _shown_in(results, run, distribution)
    }


def zero_scores(results: dict, metric: str) -> dict[int, np.ndarray]:
    return {int(seed): np.asarray(z[metric], dtype=float) for seed, z in results["zero_shot"].items()}


def _shown_in(results: dict, run: dict, distribution: str) -> bool:
    return run["distribution"] == distribution or results["variants"][run["variant"]]["distribution_free"]


def variants_in(results: dict, distribution: str) -> list[str]:
    seen = []
    for run in results["runs"]:
        if _shown_in(results, run, distribution) and run["variant"] not in seen:
            seen.append(run["variant"])
    return sorted(seen, key=lambda v: (ORDER.index(v) if v in ORDER else len(ORDER), v))


def _fmt(point: float, low: float, high: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{point:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _paired_cells(results: dict, distribution: str, variant: str, reference: dict, seeds) -> list[str]:
    """FlexLoRA minus this variant, paired on the same seeds and items (unseen tasks, clients' tasks), and the
    seeds on which FlexLoRA scored higher; dashes for FlexLoRA itself or without a FlexLoRA run."""
    cells = []
    for metric in ("test", "seen"):
        if variant == REFERENCE or not reference[metric]:
            cells.append("–")
            continue
        scores = final_scores(results, distribution, variant, metric)
        diffs = [reference[metric][s] - scores[s] for s in seeds]
        cells.append(_fmt(*bootstrap(diffs, key=f"{distribution}/{variant}/{metric}/diff"), signed=True))
    if variant == REFERENCE or not reference["test"]:
        return cells + ["–"]
    mine = final_scores(results, distribution, variant, HEADLINE)
    return cells + [f"{sum(reference[HEADLINE][s].mean() > mine[s].mean() for s in seeds)}/{len(seeds)}"]


def table(results: dict, distribution: str) -> str:
    """The markdown table of one distribution: mean [95% interval] per metric, and paired differences."""
    seeds = results["seeds"]
    head = ["method", "lr", *(f"{label}" for label in METRICS.values()), f"{_title(results, REFERENCE)} minus this: unseen tasks",
            f"{_title(results, REFERENCE)} minus this: clients' tasks", "FlexLoRA better on seeds", "top-r_min energy, last round"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = {m: final_scores(results, distribution, REFERENCE, m) for m in ("test", "seen")}
    for variant in variants_in(results, distribution):
        cells = [_title(results, variant), f"{_lr(results, distribution, variant):g}"]
        for metric in METRICS:
            scores = final_scores(results, distribution, variant, metric)
            cells.append(_fmt(*bootstrap([scores[s] for s in seeds], key=f"{distribution}/{variant}/{metric}")))
        cells += _paired_cells(results, distribution, variant, reference, seeds)
        energies = [run["energy"][-1] for run in _runs(results, distribution, variant) if run["energy"]]
        cells.append(f"{np.mean(energies):.3f}" if energies else "–")
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("| base model, no training | – | " + " | ".join(_base_model_cells(results, reference, seeds, METRICS)) + " | – |")
    return "\n".join(rows) + "\n"


def _base_model_cells(results: dict, reference: dict, seeds, metrics) -> list[str]:
    """The base model's row: its scores, and FlexLoRA minus it paired on the same seeds and items."""
    zero = [_fmt(*bootstrap([zero_scores(results, m)[s] for s in seeds], key=f"zero/{m}")) for m in metrics]
    if not reference["test"]:
        return zero + ["–"] * 3
    zero += [_fmt(*bootstrap([reference[m][s] - zero_scores(results, m)[s] for s in seeds], key=f"zero/{m}/diff"), signed=True)
             for m in ("test", "seen")]  # fmt: skip
    zero.append(f"{sum(reference[HEADLINE][s].mean() > zero_scores(results, HEADLINE)[s].mean() for s in seeds)}/{len(seeds)}")
    return zero


def compact_table(results: dict, distribution: str) -> str:
    """The headline columns only (for the top-level README): unseen tasks, clients' tasks, paired differences."""
    seeds = results["seeds"]
    rows = ["| method | unseen tasks | clients' tasks | FlexLoRA minus this: unseen | FlexLoRA minus this: clients' tasks |", "|---|---|---|---|---|"]
    reference = {m: final_scores(results, distribution, REFERENCE, m) for m in ("test", "seen")}
    for variant in variants_in(results, distribution):
        cells = [_title(results, variant)]
        for metric in ("test", "seen"):
            scores = final_scores(results, distribution, variant, metric)
            cells.append(_fmt(*bootstrap([scores[s] for s in seeds], key=f"{distribution}/{variant}/{metric}")))
        for metric in ("test", "seen"):
            scores = final_scores(results, distribution, variant, metric)
            diffs = [reference[metric][s] - scores[s] for s in seeds] if variant != REFERENCE else None
            cells.append(_fmt(*bootstrap(diffs, key=f"{distribution}/{variant}/{metric}/diff"), signed=True) if diffs else "–")
        rows.append("| " + " | ".join(cells) + " |")
    zero = [_fmt(*bootstrap([zero_scores(results, m)[s] for s in seeds], key=f"zero/{m}")) for m in ("test", "seen")]
    rows.append("| base model, no training | " + " | ".join(zero) + " | – | – |")
    return "\n".join(rows) + "\n"


def privacy_table(results: dict, distribution: str) -> str:
    """The DP variants against non-private FlexLoRA: accuracy, paired differences, and the (epsilon, delta)
    that flexlora's ledger reported after the last round ("" when the run has no DP variant)."""
    private = [v for v in variants_in(results, distribution) if results["variants"][v].get("privacy")]
    if not private:
        return ""
    seeds = results["seeds"]
    head = ["method", "clip C", "noise multiplier sigma", "epsilon (delta)", "lr", "unseen tasks", "clients' tasks",
            f"{_title(results, REFERENCE)} minus this: unseen tasks", f"{_title(results, REFERENCE)} minus this: clients' tasks",
            "FlexLoRA better on seeds", "uploads clipped"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = {m: final_scores(results, distribution, REFERENCE, m) for m in ("test", "seen")}
    for variant in ([REFERENCE] if reference["test"] else []) + private:
        runs = _runs(results, distribution, variant)
        if variant == REFERENCE:
            cells = [_title(results, variant), "–", "–", "none (no DP)"]
        else:
            clip, sigma = results["variants"][variant]["privacy"]
            reports = [r["privacy"] for r in runs]
            epsilons = sorted({round(p["epsilon"], 6) for p in reports})  # one value: the same rounds and rates every seed
            eps = "/".join(f"{e:.3g}" for e in epsilons)
            cells = [_title(results, variant), f"{clip:g}", f"{sigma:g}", f"{eps} ({reports[0]['delta']:g}, {reports[0]['rounds']} rounds)"]
        cells.append(f"{_lr(results, distribution, variant):g}")
        for metric in ("test", "seen"):
            scores = final_scores(results, distribution, variant, metric)
            cells.append(_fmt(*bootstrap([scores[s] for s in seeds], key=f"{distribution}/{variant}/{metric}")))
        cells += _paired_cells(results, distribution, variant, reference, seeds)
        clipped = [c for r in runs for c in r.get("clipped") or [] if c is not None]
        uploads = [len(n) for r in runs for n in r.get("client_norms") or [] if n is not None]
        cells.append(f"{sum(clipped) / sum(uploads):.0%}" if uploads and variant != REFERENCE else "–")
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("| base model, no training | – | – | – | – | " + " | ".join(_base_model_cells(results, reference, seeds, ("test", "seen"))) + " | – |")
    return "\n".join(rows) + "\n"


def tuning_table(results: dict) -> str:
    """Validation score at each learning rate of the grid (the tuning seed), per distribution and method."""
    if not any(results["tuning"].values()):  # every variant at a fixed rate (--fixed-lr)
        return ""
    grid = next(iter(next(iter(results["tuning"].values())).values()))["grid"]
    rows = ["| distribution | method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |", "|" + "---|" * (len(grid) + 3)]
    for distribution, variants in results["tuning"].items():
        for variant, entry in sorted(variants.items(), key=lambda item: (ORDER.index(item[0]) if item[0] in ORDER else len(ORDER), item[0])):
            cells = [f"{entry['validation'][f'{lr:g}']:.3f}" for lr in grid]
            edge = " (grid edge)" if entry["at_edge"] else ""
            rows.append(f"| {distribution} | {_title(results, variant)} | " + " | ".join(cells) + f" | {entry['chosen']:g}{edge} |")
    return "\n".join(rows) + "\n"


def ranks_table(results: dict) -> str:
    """HetLoRA's self-pruning: ranks before and after, per distribution (mean over seeds)."""
    rows = ["| distribution | method | mean client rank at start | mean client rank at the end | self-prunes per run |", "|---|---|---|---|---|"]
    for distribution in results["distributions"]:
        for variant in variants_in(results, distribution):
            runs = [r for r in _runs(results, distribution, variant) if r["distribution"] == distribution]
            if not runs or not any(sum(r["prunes"]) for r in runs):
                continue
            start = np.mean([np.mean(r["ranks"]) for r in runs])
            end = np.mean([np.mean(r["final_ranks"]) for r in runs])
            prunes = np.mean([sum(r["prunes"]) for r in runs])
            rows.append(f"| {distribution} | {_title(results, variant)} | {start:.2f} | {end:.2f} | {prunes:.1f} |")
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def timing_line(results: dict) -> str:
    timing, env = results["timing"], results["environment"]
    load = timing["load_average"]
    reused = sum(1 for run in results["runs"] if run.get("reused"))
    sources = ", ".join(sorted({run["reused"] for run in results["runs"] if run.get("reused")}))
    taken = f"; {reused} of its {len(results['runs'])} runs were taken from {sources} (not rerun; their times are not in this line)" if reused else ""
    return (f"{results['config']['mode']} run{taken}: {timing['wall_seconds'] / 60:.1f} min wall ({timing['tuning_seconds'] / 60:.1f} min tuning), "
            f"{timing['cpu_seconds'] / 60:.1f} CPU-min, {env['jobs']} worker process(es) x {env['threads_per_job']} thread(s) on "
            f"{env['cpus']} CPUs; load average {load['mean']:.1f} mean ({load['min']:.1f}-{load['max']:.1f}); Python {env['python']}, "
            f"torch {env['packages']['torch']}; corpus {env['corpus']['tasks']} tasks, {env['corpus']['items']} items "
            f"(fingerprint {env['corpus']['fingerprint']}).")  # fmt: skip


def markdown(results: dict) -> str:
    config = results["config"]
    parts = [
        f"Seeds {', '.join(map(str, results['seeds']))}; {config['clients']} clients, {config['per_round']} per round, "
        f"{config['rounds']} rounds of {config['steps']} local steps (batch {config['batch_size']}); learning rates chosen on seed "
        f"{results['tune_seed']}'s validation tasks from {config['lr_grid']}. Mean over seeds [95% two-level bootstrap interval].\n",
    ]
    for distribution in results["distributions"]:
        parts.append(f"**{distribution}**\n\n" + table(results, distribution))
        private = privacy_table(results, distribution)
        if private:
            parts.append(f"Differential privacy (**{distribution}**; epsilon at delta from flexlora's ledger, dp-accounting's RDP "
                         "accountant, after the last round):\n\n" + private)
    tuned = tuning_table(results)
    if tuned:
        parts.append("Validation score by learning rate (tuning seed; mean of the unseen validation tasks' and the clients' held-out "
                     "validation items' accuracy, last round):\n\n" + tuned)
    pruning = ranks_table(results)
    if pruning:
        parts.append("Rank self-pruning:\n\n" + pruning)
    parts.append(timing_line(results) + "\n")
    return "\n".join(parts)


def plots(results: dict, out: Path) -> list[Path]:
    """accuracy_by_round.png (unseen tasks and clients' tasks) and energy_by_round.png, one column per distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distributions = results["distributions"]
    palette = [*plt.get_cmap("tab10").colors, "black", "gray", "olive", "teal", "navy"]
    colors = dict(zip(ORDER, palette))
    panels = {
        "accuracy_by_round.png": [("test", "unseen tasks: accuracy"), ("seen", "clients' tasks: accuracy")],
        "energy_by_round.png": [("energy", "energy share of the top r_min components")],
    }
    written = []
    for name, rows in panels.items():
        figure, axes = plt.subplots(len(rows), len(distributions), figsize=(5.5 * len(distributions), 3.8 * len(rows)), squeeze=False)
        for row, (key, ylabel) in enumerate(rows):
            for axis, distribution in zip(axes[row], distributions):
                for variant in variants_in(results, distribution):
                    runs = _runs(results, distribution, variant)
                    if key == "energy":
                        curves = [r["energy"] for r in runs if r["energy"]]
                        if not curves or variant == "centralised":
                            continue
                        rounds = list(range(1, len(curves[0]) + 1))
                    else:
                        zero = results["zero_shot"]
                        curves = [[float(np.mean(zero[str(r["seed"])][key]))] + r["curves"][key] for r in runs]
                        rounds = [0] + runs[0]["rounds"]
                    axis.plot(rounds, np.mean(curves, axis=0), marker="o" if len(rounds) < 12 else None, color=colors.get(variant),
                              label=_title(results, variant))  # fmt: skip
                axis.set(title=f"{distribution} ({len(results['seeds'])} seeds, mean)", xlabel="round", ylabel=ylabel)
                axis.xaxis.get_major_locator().set_params(integer=True)
                axis.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(out / name)
    return written


def _runs(results: dict, distribution: str, variant: str) -> list[dict]:
    return [r for r in results["runs"] if r["variant"] == variant and not r["tuning_only"] and _shown_in(results, r, distribution)]


def _lr(results: dict, distribution: str, variant: str) -> float:
    return _runs(results, distribution, variant)[0]["lr"]


def _title(results: dict, variant: str) -> str:
    return results["variants"].get(variant, {}).get("title", variant)


def write(results: dict, out: Path) -> None:
    """results.md and the plots, beside results.json."""
    (out / "results.md").write_text(markdown(results))
    plots(results, out)


def replace_block(path: Path, block: str, text: str) -> None:
    """Put `text` between <!-- results:BLOCK --> and <!-- /results:BLOCK --> in a markdown file."""
    source = path.read_text()
    start, end = f"<!-- results:{block} -->", f"<!-- /results:{block} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if not pattern.search(source):
        raise SystemExit(f"{path}: no {start} ... {end} block")
    path.write_text(pattern.sub(lambda _: f"{start}\n{text.rstrip()}\n{end}", source))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, action="append", default=[], help="markdown file(s) with a results block to rewrite")
    parser.add_argument("--block", default="default", help="the block's name: <!-- results:NAME -->")
    parser.add_argument("--compact", action="store_true", help="only the first distribution's headline columns (for the top README)")
    parser.add_argument("--privacy", action="store_true", help="only the first distribution's differential-privacy table")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    write(results, args.results.parent)
    for readme in args.readme:
        first = results["distributions"][0]
        if args.privacy:
            text = privacy_table(results, first) + "\n" + timing_line(results)
        else:
            text = compact_table(results, first) + "\n" + timing_line(results) if args.compact else markdown(results)
        replace_block(readme, args.block, text)


if __name__ == "__main__":
    main()
