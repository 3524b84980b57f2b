"""A federated fine-tuning of all-MiniLM-L6-v2 with heterogeneous LoRA ranks, every round a file exchange through flexlora.

About 48 clients, one task (a Python module's docstrings) each, 10 sampled per round; the global model is
scored on unseen tasks (modules no client trained on). Each method's learning rate is chosen once, from a
small grid, on one seed's validation tasks; then every seed runs at that rate. Writes
results/results.json (every curve and per-item score) and, through report.py, results/results.md and the
plots.

    python examples/federated_minilm/federate.py            # the default: one distribution, core methods, 5 seeds
    python examples/federated_minilm/federate.py --quick    # the CI smoke test (its first server round is the CLI)
    python examples/federated_minilm/federate.py --full     # four distributions, every method and ablation
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402  (light: no torch)

DEFAULTS = dict(
    seeds="0,1,2,3,4", tune_seed=0, distributions="heavy-tail-light", variants="core", lr_grid="0.05,0.1,0.2",
    clients=48, per_round=10, rounds=20, steps=4, batch_size=8, eval_every=5, validation_tasks=10, test_tasks=12,
    items_per_task=40, eval_items=24, local_eval_clients=8, cli_rounds=0, score_training=False,
)  # fmt: skip
QUICK = dict(seeds="0", distributions="heavy-tail-light", variants="core", lr_grid="0.1", clients=8, per_round=4, rounds=3,
             eval_every=3, validation_tasks=6, test_tasks=6, items_per_task=24, eval_items=16, local_eval_clients=4, cli_rounds=1,
             score_training=True)  # fmt: skip
FULL = dict(distributions="all", variants="full")


def jobs_plan(config: dict) -> tuple[list[tuple[str, str]], list[int]]:
    """(distribution, variant) settings to run, and the seeds."""
    from federation import CORE, DP, FULL as FULL_VARIANTS, VARIANTS

    names = {"core": CORE, "full": FULL_VARIANTS, "dp": DP}.get(config["variants"]) or tuple(config["variants"].split(","))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    stray = [n for n in config.get("fixed_lr") or {} if not fnmatch.filter(names, n)]
    if stray:
        raise SystemExit(f"--fixed-lr names variants this run does not have: {', '.join(stray)}")
    distributions = list(tasks.DISTRIBUTIONS) if config["distributions"] == "all" else config["distributions"].split(",")
    settings = []
    for name in names:
        # A variant whose ranks do not depend on the distribution runs once, under the first distribution.
        for distribution in distributions[:1] if VARIANTS[name].distribution_free else distributions:
            settings.append((distribution, name))
    return settings, [int(s) for s in str(config["seeds"]).split(",")]


# --- the worker: one federation run per job -------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(config: dict) -> None:
    import torch

    import client
    import corpus

    torch.set_num_threads(config["threads"])
    _WORKER.update(config=config, corpus=corpus.load(config.get("cache")), encoder=client.Encoder(top_layers=config["top_layers"]),
                   seeds={})  # fmt: skip


def _seed_state(seed: int):
    """The seed's federation, its scorer and the base model's scores (built once per worker)."""
    import federation

    if seed not in _WORKER["seeds"]:
        config, encoder = _WORKER["config"], _WORKER["encoder"]
        drawn = tasks.make_federation(_WORKER["corpus"], seed, config["clients"], config["validation_tasks"], config["test_tasks"],
                                      config["items_per_task"], config["eval_items"])  # fmt: skip
        encoder.warm(drawn.all_texts())
        scorer = federation.Scorer(encoder, drawn, training=config["score_training"])
        zero = {part: v.tolist() for part, v in scorer.score(None, scorer.parts).items()}
        _WORKER["seeds"][seed] = (drawn, scorer, zero)
    return _WORKER["seeds"][seed]


def _run_job(job: dict) -> dict:
    import federation

    config = _WORKER["config"]
    drawn, scorer, zero = _seed_state(job["seed"])
    ranks = tasks.client_ranks(job["distribution"], config["clients"], job["seed"])
    settings = federation.Settings(rounds=config["rounds"], per_round=config["per_round"], steps=config["steps"],
                                   batch_size=config["batch_size"], eval_every=config["eval_every"],
                                   local_eval_clients=config["local_eval_clients"], cli_rounds=config["cli_rounds"])  # fmt: skip
    work = Path(config["work"]) / job["distribution"] / job["variant"] / f"seed-{job['seed']}" / f"lr-{job['lr']:g}"
    if work.exists():
        shutil.rmtree(work)
    record = federation.run(federation.VARIANTS[job["variant"]], drawn, ranks, job["lr"], settings, _WORKER["encoder"], scorer, work)
    if not config["keep_work"]:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{job['distribution']:17} {job['variant']:17} seed {job['seed']} lr {job['lr']:<5g} validation {federation.validation_score(record):.3f} "
          f"unseen {record['curves']['test'][-1]:.3f} seen {record['curves']['seen'][-1]:.3f} ({record['seconds']:.0f}s)", flush=True)  # fmt: skip
    return {**job, **record, "zero_shot": zero}


def _run_group(group: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return [(index, _run_job(job)) for index, job in group]


def _map(config: dict, jobs: list[dict]) -> list[dict]:
    """Run jobs in `config['jobs']` worker processes (in this process when 1), results in job order.

    A worker caches the frozen layers' outputs per seed (about 20 s of CPU per seed), so jobs are dealt
    out by seed: each worker gets whole seeds where there are enough seeds to go round, else a share
    of one seed's jobs.
    """
    indexed = list(enumerate(jobs))
    workers = max(1, min(config["jobs"], len(jobs)))
    if workers == 1:
        if not _WORKER:
            _init_worker(config)
        return [result for _, result in _run_group(indexed)]
    seeds = sorted({job["seed"] for job in jobs})
    groups: list[list[tuple[int, dict]]] = [[] for _ in range(workers)]
    if len(seeds) >= workers:
        for seed in seeds:
            min(groups, key=len).extend(item for item in indexed if item[1]["seed"] == seed)
    else:
        for position, item in enumerate(indexed):
            groups[position % workers].append(item)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        done = dict(item for group in pool.map(_run_group, groups, chunksize=1) for item in group)
    return [done[index] for index in range(len(jobs))]


# --- the sweep ------------------------------------------------------------------------------------------


# What must match for a run of an earlier results.json to stand for a run of this sweep.
SAME_SETUP = ("clients", "per_round", "rounds", "steps", "batch_size", "eval_every", "validation_tasks", "test_tasks",
              "items_per_task", "eval_items", "local_eval_clients", "top_layers", "lr_grid", "tune_seed", "score_training")  # fmt: skip


def reusable(config: dict, paths: list[str]) -> dict[tuple, dict]:
    """Runs of earlier sweeps with the same setup and corpus, by (distribution, variant, seed, lr)."""
    import corpus

    found = {}
    fingerprint = corpus.fingerprint(corpus.load(config.get("cache"))) if paths else None
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        different = [k for k in SAME_SETUP if earlier["config"].get(k) != config.get(k)]
        if different or earlier["environment"]["corpus"]["fingerprint"] != fingerprint:
            raise SystemExit(f"{path}: another setup ({', '.join(different) or 'corpus'} differ); cannot reuse its runs")
        for r in earlier["runs"]:
            found.setdefault((r["distribution"], r["variant"], r["seed"], r["lr"]),
                             {**r, "zero_shot": earlier["zero_shot"][str(r["seed"])], "reused": f"{Path(path).parent.name}/{Path(path).name}"})  # fmt: skip
    return found


def _map_reusing(config: dict, jobs: list[dict], earlier: dict[tuple, dict]) -> list[dict]:
    key = lambda job: (job["distribution"], job["variant"], job["seed"], job["lr"])  # noqa: E731
    todo = [job for job in jobs if key(job) not in earlier]
    done = {key(job): run for job, run in zip(todo, _map(config, todo))} if todo else {}
    return [dict(done.get(key(job)) or earlier[key(job)]) for job in jobs]


def sweep(config: dict) -> dict:
    """Tune each setting's learning rate on the tuning seed's validation tasks, then run every seed at it."""
    from federation import VARIANTS, validation_score

    started, usage = time.perf_counter(), _cpu_seconds()
    load = _LoadSampler()
    earlier = reusable(config, config.get("reuse") or [])
    settings, seeds = jobs_plan(config)
    grid = [float(x) for x in str(config["lr_grid"]).split(",")]
    tune_seed = config["tune_seed"] if config["tune_seed"] in seeds else seeds[0]
    # Slow methods first, so the last jobs to finish are short ones.
    order = {"lora-fair": 0, "flora": 1, "hetlora": 2, "local": 3}
    # Each method's rate is tuned once, under the first distribution; the others run at it (as the issue asks:
    # tuned once, on one seed's validation split). `--tune-each` tunes every (distribution, method) instead.
    tuned = settings if config.get("tune_each") else [(d, v) for d, v in settings if d == settings[0][0] or VARIANTS[v].distribution_free]
    fixed = fixed_rates(config, [v for _, v in settings])  # `--fixed-lr NAME=RATE`: not tuned, every seed at RATE
    tuned = [(d, v) for d, v in tuned if v not in fixed]
    tuned_in = {v: d for d, v in reversed(tuned)}
    tuning_jobs = [dict(distribution=d, variant=v, seed=tune_seed, lr=lr) for d, v in tuned for lr in grid]
    tuning_jobs.sort(key=lambda j: order.get(j["variant"], 9))
    phase_started = time.perf_counter()
    runs = _map_reusing(config, tuning_jobs, earlier)
    tuning_seconds = time.perf_counter() - phase_started
    tuning, chosen = {}, {}
    for d, v in tuned:
        scores = {r["lr"]: validation_score(r) for r in runs if (r["distribution"], r["variant"]) == (d, v)}
        best = max(sorted(scores), key=lambda lr: scores[lr])  # ties: the smaller rate
        chosen[d, v] = best
        tuning.setdefault(d, {})[v] = {"grid": grid, "validation": {f"{lr:g}": s for lr, s in scores.items()}, "chosen": best,
                                       "at_edge": len(grid) > 1 and best in (grid[0], grid[-1])}  # fmt: skip
    for d, v in settings:
        if (d, v) not in chosen:
            chosen[d, v] = fixed[v] if v in fixed else chosen[tuned_in[v], v]
    for run in runs:
        run["tuning_only"] = run["lr"] != chosen[run["distribution"], run["variant"]]
    rest = [dict(distribution=d, variant=v, seed=s, lr=chosen[d, v]) for d, v in settings for s in seeds
            if s != tune_seed or (d, v) not in tuned]  # fmt: skip
    rest.sort(key=lambda j: order.get(j["variant"], 9))
    phase_started = time.perf_counter()
    for run in _map_reusing(config, rest, earlier):
        run["tuning_only"] = False
        runs.append(run)
    zero_shot = {}
    for run in runs:
        zero_shot.setdefault(str(run["seed"]), run.pop("zero_shot"))
    load.stop()
    return {
        "config": {k: v for k, v in config.items() if k not in ("work", "cache", "reuse")},
        "reused_from": config.get("reuse"),
        "variants": {name: {"title": VARIANTS[name].title, "method": VARIANTS[name].method, "ranks": VARIANTS[name].ranks,
                            "balanced": VARIANTS[name].balanced, "pruning": VARIANTS[name].pruning,
                            "distribution_free": VARIANTS[name].distribution_free, "privacy": VARIANTS[name].privacy,
                            "fixed_lr": fixed.get(name)} for _, name in settings},  # fmt: skip
        "distributions": sorted({d for d, _ in settings}, key=list(tasks.DISTRIBUTIONS).index),
        "seeds": seeds,
        "tune_seed": tune_seed,
        "tuning": tuning,
        "zero_shot": zero_shot,
        "federations": _federations(config, seeds, sorted({d for d, _ in settings})),
        "runs": runs,
        "environment": _environment(config),
        "timing": {"wall_seconds": time.perf_counter() - started, "tuning_seconds": tuning_seconds,
                   "seeds_seconds": time.perf_counter() - phase_started, "cpu_seconds": _cpu_seconds() - usage,
                   "load_average": load.summary()},  # fmt: skip
    }


def _federations(config: dict, seeds: list[int], distributions: list[str]) -> dict:
    """What each seed drew (task names and client ranks), to trace every number to its setup."""
    import corpus

    text = corpus.load(config.get("cache"))
    described = {}
    for seed in seeds:
        drawn = tasks.make_federation(text, seed, config["clients"], config["validation_tasks"], config["test_tasks"],
                                      config["items_per_task"], config["eval_items"])  # fmt: skip
        described[str(seed)] = {
            "train_tasks": list(drawn.train_tasks), "validation_tasks": list(drawn.validation_tasks), "test_tasks": list(drawn.test_tasks),
            "client_items": [len(c.items.texts) for c in drawn.clients],
            "eval_items": {name: len(items.texts) for name, items in drawn.eval_sets().items()},
            "ranks": {d: tasks.client_ranks(d, config["clients"], seed) for d in distributions},
        }  # fmt: skip
    return described


def _environment(config: dict) -> dict:
    import importlib.metadata

    import corpus

    text = corpus.load(config.get("cache"))
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft", "flexlora-cli")}
    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads_per_job": config["threads"], "jobs": config["jobs"], "packages": versions,
            "corpus": {"sources": corpus.sources(), "fingerprint": corpus.fingerprint(text), "tasks": len(text),
                       "items": sum(map(len, text.values()))}}  # fmt: skip


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _LoadSampler:
    """The machine's 1-minute load average, sampled every 15 s while the sweep runs (the machine may be shared)."""

    def __init__(self):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(15):
            self.samples.append(os.getloadavg()[0])

    def stop(self):
        self._stop.set()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"start": self.samples[0], "end": self.samples[-1], "mean": sum(self.samples) / len(self.samples),
                "min": min(self.samples), "max": max(self.samples)}  # fmt: skip


# --- command line -----------------------------------------------------------------------------------------


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"smoke-test size (CI): {QUICK}")
    size.add_argument("--full", action="store_true", help=f"the whole matrix: {FULL}")
    parser.add_argument("--seeds", help=f"comma-separated seeds (default {DEFAULTS['seeds']})")
    parser.add_argument("--tune-seed", type=int, help="the seed whose validation tasks choose each method's learning rate")
    parser.add_argument("--distributions", help="comma-separated rank distributions, or all: " + ", ".join(tasks.DISTRIBUTIONS))
    parser.add_argument("--variants", help="core, full, dp (FlexLoRA and its DP variants), or comma-separated names (see federation.VARIANTS)")
    parser.add_argument("--lr-grid", help="comma-separated learning rates to choose from")
    for name in ("clients", "per_round", "rounds", "steps", "batch_size", "eval_every", "validation_tasks", "test_tasks",
                 "items_per_task", "eval_items", "local_eval_clients", "cli_rounds"):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {DEFAULTS[name]}")
    parser.add_argument("--top-layers", type=int, default=1, help="LoRA on this many top layers (the rest are frozen and cached)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (one run each at a time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results.json, results.md and the plots")
    parser.add_argument("--work", help="keep every round's adapters here (default: a temporary folder, deleted)")
    parser.add_argument("--cache", help="corpus cache folder (default $FLEXLORA_EXAMPLE_CACHE or ~/.cache/flexlora-example)")
    parser.add_argument("--tune-each", action="store_true", help="tune every (distribution, method) (default: each method once, under the first distribution)")
    parser.add_argument("--fixed-lr", action="append", metavar="NAME=RATE", type=_fixed_rate,
                        help="run variant NAME (a shell pattern: 'flexlora-dp-*') at learning rate RATE on every seed, not tuned "
                             "(repeatable); the grid still tunes the others")
    parser.add_argument("--reuse", action="append", help="an earlier results.json with the same setup: its runs are taken, not run again (repeatable)")
    args = parser.parse_args(argv)
    config = dict(DEFAULTS)
    config.update(QUICK if args.quick else FULL if args.full else {})
    for key, value in vars(args).items():
        if value is not None and key not in ("quick", "full"):
            config[key] = value
    if args.fixed_lr:
        config["fixed_lr"] = dict(args.fixed_lr)
    plain = all(config[k] == DEFAULTS[k] for k in ("seeds", "distributions", "variants"))
    config["mode"] = "quick" if args.quick else "full" if args.full else "default" if plain else "custom"
    return config


def fixed_rates(config: dict, variants: list[str]) -> dict[str, float]:
    """variant -> its --fixed-lr rate (the first NAME=RATE whose NAME, a shell pattern, matches it)."""
    rates = {}
    for pattern, rate in (config.get("fixed_lr") or {}).items():
        for name in fnmatch.filter(variants, pattern):
            rates.setdefault(name, rate)
    return rates


def _fixed_rate(text: str) -> tuple[str, float]:
    name, _, rate = text.partition("=")
    try:
        value = float(rate)
    except ValueError:
        value = float("nan")
    if not name or not value > 0:
        raise argparse.ArgumentTypeError(f"expected NAME=RATE with a positive RATE, e.g. 'flexlora-dp-*=0.05'; got {text!r}")
    return name, value


def dumps(results: dict) -> str:
    """results.json's text: compact JSON, one line per top-level key and one per run (small, and diffs stay readable)."""
    line = lambda value: json.dumps(value, sort_keys=True, separators=(",", ":"))  # noqa: E731
    body = [json.dumps(key) + ":" + ("[\n" + ",\n".join(map(line, value)) + "\n]" if key == "runs" else line(value))
            for key, value in sorted(results.items())]  # fmt: skip
    return "{\n" + ",\n".join(body) + "\n}\n"


def main(argv=None) -> None:
    config = parse(argv)
    config["keep_work"] = bool(config.get("work"))
    config["work"] = config.get("work") or tempfile.mkdtemp(prefix="flexlora-federation-")
    out = Path(config["out"])
    try:
        results = sweep(config)
    finally:
        if not config["keep_work"]:
            shutil.rmtree(config["work"], ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dumps(results))
    import report

    report.write(results, out)
    timing = results["timing"]
    print(f"wrote {out}/results.json, results.md and plots: {timing['wall_seconds'] / 60:.1f} min wall, "
          f"{timing['cpu_seconds'] / 60:.1f} CPU-min, load average {timing['load_average']['mean']:.1f} (mean)")  # fmt: skip


if __name__ == "__main__":
    main()
