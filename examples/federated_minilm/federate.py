"""A real federated fine-tuning of all-MiniLM-L6-v2 with heterogeneous LoRA ranks, every round through the CLI.

Each round, every client loads its adapter with PEFT, trains on its own docstrings, and saves it
to rounds/r<k>/clients/<client>/; the server is `flexlora aggregate --method M` run as a
subprocess, which writes the next round's adapters to rounds/r<k+1>/server/ (a file exchange).
Methods compared on the same seeds, data and initialisation:

  flexlora  heterogeneous ranks, FlexLoRA aggregation (the global model is the exact weighted update)
  hetlora   heterogeneous ranks, HetLoRA zero-padded averaging (the global model is the rank-r_max average)
  fedavg    every client at the smallest rank, FedAvg of A and B (the "bucket effect")
  local     heterogeneous ranks, no federation (each client's own model)

The score is accuracy on held-out clients (docstrings no client trained on) after each round.

    python examples/federated_minilm/federate.py            # default: about 15 minutes on 2 idle cores
    python examples/federated_minilm/federate.py --quick    # smoke test, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import client
import corpus

HERE = Path(__file__).resolve().parent
METHODS = ("flexlora", "hetlora", "fedavg", "local")
LARGEST_COPY = "flexlora, r_max client"  # a second view of the flexlora runs (not a separate federation)

# Five rank levels 20x apart, the paper's 8, 16, 30, 100, 200 (for a much wider model) scaled by
# 1/10 for MiniLM's width of 384; and the share of clients at each level in each distribution.
RANK_LEVELS = (1, 2, 3, 10, 20)
DISTRIBUTIONS = {
    "uniform": (0.2, 0.2, 0.2, 0.2, 0.2),
    "heavy-tail-light": (0.4, 0.3, 0.15, 0.1, 0.05),  # most clients small, few large
    "normal": (0.1, 0.2, 0.4, 0.2, 0.1),
    "heavy-tail-strong": (0.05, 0.1, 0.15, 0.3, 0.4),  # most clients large
}

DEFAULTS = dict(seeds="0,1,2", distribution="heavy-tail-light", clients=8, modules_per_client=3, items_per_module=40,
                heldout_clients=4, rounds=5, steps=4, batch_size=16, lr=2e-3)  # fmt: skip
QUICK = dict(seeds="0", clients=4, modules_per_client=2, items_per_module=16, heldout_clients=2, rounds=2, steps=3,
             batch_size=8)  # fmt: skip


def client_ranks(distribution: str, count: int, seed: int) -> list[int]:
    """Ranks for `count` clients in the distribution's proportions (largest remainder), shuffled by seed."""
    shares = DISTRIBUTIONS[distribution]
    exact = [share * count for share in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (exact[i] - counts[i], i), reverse=True)
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    ranks = [level for level, n in zip(RANK_LEVELS, counts) for _ in range(n)]
    random.Random(seed).shuffle(ranks)
    return ranks


def aggregate(method: str, uploads: Path, clients, target: Path) -> dict:
    """The server: `flexlora aggregate` as a subprocess, reading the uploads, writing next round's adapters."""
    command = [*flexlora_command(), "aggregate", *(f"{c.name}={uploads / c.name}" for c in clients),
               "--method", method, "--num-samples", ",".join(str(len(c.items)) for c in clients),
               "-o", str(target), "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"flexlora aggregate failed ({done.returncode}):\n{' '.join(command)}\n{done.stderr}")
    return json.loads(done.stdout)


def flexlora_command() -> list[str]:
    installed = Path(sys.executable).with_name("flexlora")
    return [str(installed)] if installed.exists() else [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()"]


def federate(method: str, seed: int, federation, ranks: list[int], encoder, settings, work: Path) -> dict:
    """One federation: `settings.rounds` rounds; held-out accuracy of the global model after each."""
    from flexlora_cli import api

    clients, labels = federation.clients, federation.labels
    if method == "fedavg":
        ranks = [min(ranks)] * len(ranks)  # the bucket effect: everyone at the weakest client's rank
    inbox = work / "r1" / "server"
    for c, rank in zip(clients, ranks):
        client.init_adapter(encoder, rank, max(ranks), seed, inbox / c.name)
    curve, losses, largest_copy = [], [], []
    for k in range(1, settings.rounds + 1):
        uploads = work / f"r{k}" / "clients"
        round_losses = [
            client.train(encoder, inbox / c.name, uploads / c.name, c.items, labels, settings.steps,
                         settings.batch_size, settings.lr, seed=1000 * seed + 100 * k + i)  # fmt: skip
            for i, c in enumerate(clients)
        ]
        losses.append(statistics.fmean(round_losses))
        if method == "local":
            inbox = uploads
            curve.append(statistics.fmean(client.evaluate(encoder, uploads / c.name, federation.heldout, labels) for c in clients))
            continue
        inbox = work / f"r{k + 1}" / "server"
        aggregate(method, uploads, clients, inbox)
        largest = inbox / clients[ranks.index(max(ranks))].name
        if method == "flexlora":
            # The paper's global model: the exact weighted update, not any client's truncation of it.
            global_model = work / f"r{k}" / "global"
            api.merge([uploads / c.name for c in clients], global_model, num_samples=[len(c.items) for c in clients])
            # Also what the largest client gets (its best rank-r_max approximation), to compare
            # with HetLoRA's global model at the same rank.
            largest_copy.append(client.evaluate(encoder, largest, federation.heldout, labels))
        else:
            global_model = largest  # HetLoRA's global adapter is the padded average at r_max: that client's copy
        curve.append(client.evaluate(encoder, global_model, federation.heldout, labels))
    return {"ranks": ranks, "accuracy": curve, "train_loss": losses, **({"largest_copy": largest_copy} if largest_copy else {})}


def run(settings) -> dict:
    import torch

    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    encoder = client.Encoder(top_layers=settings.top_layers)
    work_root = Path(settings.work) if settings.work else Path(tempfile.mkdtemp(prefix="flexlora-federation-"))
    distributions = list(DISTRIBUTIONS) if settings.distribution == "all" else [settings.distribution]
    runs = []
    for seed in [int(s) for s in settings.seeds.split(",")]:
        federation = corpus.make_federation(
            seed, settings.clients, settings.modules_per_client, settings.items_per_module, settings.heldout_clients
        )
        encoder.warm([item.text for c in federation.clients + federation.heldout for item in c.items] + federation.labels)
        zero_shot = client.evaluate(encoder, None, federation.heldout, federation.labels)
        for distribution in distributions:
            ranks = client_ranks(distribution, settings.clients, seed)
            for method in settings.methods.split(","):
                clock = time.perf_counter()
                result = federate(method, seed, federation, ranks, encoder, settings, work_root / distribution / f"seed-{seed}" / method)
                result["accuracy"] = [zero_shot] + result["accuracy"]
                copy = result.pop("largest_copy", None)
                seconds = time.perf_counter() - clock
                runs.append({"distribution": distribution, "method": method, "seed": seed, **result, "seconds": seconds})
                if copy:
                    runs.append({**runs[-1], "method": LARGEST_COPY, "accuracy": [zero_shot] + copy, "seconds": 0.0})
                print(f"{distribution:18} seed {seed} {method:8} ranks {result['ranks']} accuracy by round "
                      f"{' '.join(f'{a:.3f}' for a in result['accuracy'])} ({seconds:.0f}s)", flush=True)  # fmt: skip
    if not settings.work:
        shutil.rmtree(work_root, ignore_errors=True)
    return {"settings": vars(settings), "runs": runs, "seconds": time.perf_counter() - started, "threads": settings.threads,
            "python": sys.version.split()[0]}  # fmt: skip


def summarize(results: dict) -> str:
    """A markdown table: held-out accuracy after the last round, mean ± std over seeds.

    Seeds draw different modules, so the absolute accuracy varies with the seed; the paired
    columns (same seed, same data) show the differences between methods more precisely.
    """
    rows = ["| distribution | method | client ranks (one list per seed) | held-out accuracy, last round "
            "| gain over the base model (paired) | flexlora minus this (paired) | best round |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    final = {(r["distribution"], r["method"], r["seed"]): r["accuracy"][-1] for r in results["runs"]}
    groups, zero_shot = {}, {}
    for r in results["runs"]:
        groups.setdefault((r["distribution"], r["method"]), []).append(r)
        zero_shot.setdefault(r["distribution"], {})[r["seed"]] = r["accuracy"][0]
    for (distribution, method), group in groups.items():
        seeds = [r["seed"] for r in group]
        finals = [final[distribution, method, s] for s in seeds]
        gains = [f - zero_shot[distribution][s] for f, s in zip(finals, seeds)]
        versus = [final.get((distribution, "flexlora", s)) for s in seeds]
        versus = _mean_std([v - f for v, f in zip(versus, finals)]) if method != "flexlora" and None not in versus else "-"
        curves = [statistics.fmean(values) for values in zip(*(r["accuracy"] for r in group))]
        ranks = "; ".join(",".join(map(str, r["ranks"])) for r in group)
        best = max(range(len(curves)), key=curves.__getitem__)
        rows.append(f"| {distribution} | {method} | {ranks} | {_mean_std(finals)} | {_mean_std(gains, signed=True)} | {versus} | {best} |")
    for distribution, values in zero_shot.items():
        rows.append(f"| {distribution} | base model (zero-shot) | - | {_mean_std(list(values.values()))} | - | - | - |")
    seeds = sorted({r["seed"] for r in results["runs"]})
    return "\n".join(rows) + f"\n\n{len(seeds)} seed(s) {seeds}; total time {results['seconds'] / 60:.1f} min with {results['threads']} thread(s).\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distributions = list(dict.fromkeys(r["distribution"] for r in results["runs"]))
    figure, axes = plt.subplots(1, len(distributions), figsize=(5.5 * len(distributions), 4), squeeze=False)
    for axis, distribution in zip(axes[0], distributions):
        for method in dict.fromkeys(r["method"] for r in results["runs"]):
            curves = [r["accuracy"] for r in results["runs"] if r["distribution"] == distribution and r["method"] == method]
            mean = [statistics.fmean(v) for v in zip(*curves)]
            spread = [statistics.pstdev(v) for v in zip(*curves)]
            rounds = range(len(mean))
            axis.plot(rounds, mean, marker="o", label=method)
            axis.fill_between(rounds, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], alpha=0.15)
        seeds = len({r["seed"] for r in results["runs"]})
        axis.set(title=f"ranks: {distribution} (mean ± std, {seeds} seeds)", xlabel="round", ylabel="held-out accuracy", xticks=list(rounds))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mean_std(values: list[float], signed: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{'+' if signed else ''}.3f} ± {spread:.3f}"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke-test size: {QUICK}")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--distribution", choices=[*DISTRIBUTIONS, "all"], help="rank distribution across clients")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    for name in ("clients", "modules_per_client", "items_per_module", "heldout_clients", "rounds", "steps", "batch_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--top-layers", type=int, default=2, help="LoRA on this many top layers (the rest are frozen and cached)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results.json, results.md, accuracy_by_round.png")
    parser.add_argument("--work", help="keep every round's adapters here (default: a temporary folder, deleted)")
    settings = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if settings.quick else {})}.items():
        if getattr(settings, key) is None:
            setattr(settings, key, value)
    unknown = set(settings.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    return settings


def main(argv=None) -> None:
    settings = parse(argv)
    results = run(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    table = summarize(results)
    (out / "results.md").write_text(table)
    plot(results, out / "accuracy_by_round.png")
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_by_round.png'}")


if __name__ == "__main__":
    main()
