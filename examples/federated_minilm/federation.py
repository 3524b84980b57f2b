"""One federation run: a method variant, a seed's federation, a learning rate -> curves and final per-item scores.

Each round, the sampled clients load the adapter they were handed (server.py says which, per method),
train one local epoch's worth of steps, and save their uploads; the server aggregates them with
`flexlora aggregate --method M --global`; the global model is scored every `eval_every` rounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import client
import server
import tasks


@dataclass(frozen=True)
class Variant:
    """A method as this experiment runs it."""

    name: str  # the key in results.json
    title: str  # how the tables name it
    method: str | None  # the `flexlora aggregate --method`; None for local and centralised training
    ranks: str = "own"  # own: the distribution's ranks; min / max: every client at the smallest / largest rank
    start: str = "split"  # how a client that missed the last round starts: split | first (columns) | fold | own
    balanced: bool = False  # --balanced: sqrt(S) on both factors
    pruning: bool = False  # HetLoRA's client-side rank self-pruning
    privacy: tuple[float, float] | None = None  # (clip C, noise multiplier sigma): client-level DP (uniform weights)
    distribution_free: bool = False  # its runs do not depend on the rank distribution (run once, shown in each)


# C bounds a client's whole upload ||s B A||_F (all modules): a FlexLoRA client uploads its adapter, not a
# difference, so C also caps the global model's norm. 1.6 is the median over all 200 uploads of the
# non-private FlexLoRA run (seed 0, lr 0.05: 0.13 in round 1, 2.17 in round 20).
DP_CLIP = 1.6
# Noise multipliers sigma: epsilon 7.78, 85.8, 870 and 1.2e4 at delta 1e-5 after 20 rounds at sampling rate 10/48.
DP_NOISE = (1.0, 0.3, 0.1, 0.03)
DP_DELTA = 1e-5  # flexlora's default --dp-delta

VARIANTS = {
    v.name: v
    for v in (
        Variant("flexlora", "FlexLoRA", "flexlora"),
        Variant("hetlora", "HetLoRA (self-pruning)", "hetlora", start="first", pruning=True),
        Variant("flora", "FLoRA (fold, fresh LoRA)", "flora", start="fold"),
        Variant("fedavg-rmin", "FedAvg, all at r_min", "fedavg", ranks="min", start="first", distribution_free=True),
        Variant("fedavg-rmax", "FedAvg, all at r_max", "fedavg", ranks="max", start="first", distribution_free=True),
        Variant("local", "local training only", None, start="own"),
        Variant("centralised", "centralised (all data, r_max)", None, ranks="max", start="own", distribution_free=True),
        Variant("raflora", "RaFLoRA", "raflora"),
        Variant("lora-fair", "LoRA-FAIR", "lora-fair", start="first"),
        Variant("flexlora-balanced", "FlexLoRA --balanced", "flexlora", balanced=True),
        Variant("flexlora-rmin", "FlexLoRA, all at r_min", "flexlora", ranks="min", distribution_free=True),
        # Client-level DP (aggregate --clip C --dp-noise SIGMA, uniform weights, one ledger per run): one variant
        # per noise multiplier, all at DP_CLIP; not in any default list (README, "Differential privacy").
        *(Variant(f"flexlora-dp-s{sigma:g}", f"FlexLoRA + DP (C {DP_CLIP:g}, sigma {sigma:g})", "flexlora", privacy=(DP_CLIP, sigma))
          for sigma in DP_NOISE),
    )
}
CORE = ("flexlora", "hetlora", "flora", "fedavg-rmin", "fedavg-rmax", "local", "centralised")
FULL = (*CORE, "raflora", "lora-fair", "flexlora-balanced", "flexlora-rmin")
DP = ("flexlora", *(name for name, v in VARIANTS.items() if v.privacy))  # `--variants dp`: the DP table's rows
SELF_PRUNING = client.SelfPruning(gamma=0.99, strength=0.01)
R_MAX = max(tasks.RANK_LEVELS)


@dataclass(frozen=True)
class Settings:
    rounds: int
    per_round: int
    steps: int
    batch_size: int
    eval_every: int
    local_eval_clients: int
    cli_rounds: int = 0  # the first rounds' server step runs as the `flexlora` CLI (a subprocess)


EVAL_PARTS = ("validation", "validation_seen", "validation_all", "test", "seen", "test_all")


class Scorer:
    """Per-item correctness of a model on one seed's evaluation sets, within each item's task or among all names."""

    def __init__(self, encoder: client.Encoder, federation: tasks.Federation, training: bool = False):
        self.encoder = encoder
        vocabulary = federation.all_labels()
        self.matrix = encoder.labels(vocabulary)
        index = {label: i for i, label in enumerate(vocabulary)}
        self.sets = federation.eval_sets()
        if training:  # the clients' own training items (the quick run checks that the federation fits them)
            self.sets["training"] = tasks.Items(*(tuple(x for c in federation.clients for x in getattr(c.items, f)) for f in ("texts", "labels", "tasks")))
        self.parts = EVAL_PARTS + (("training",) if training else ())
        self.gold = {name: torch.tensor([index[x] for x in items.labels]) for name, items in self.sets.items()}
        masks = {task: torch.zeros(len(vocabulary), dtype=torch.bool) for task in federation.candidates}
        for task, labels in federation.candidates.items():
            masks[task][[index[x] for x in labels]] = True
        self.within = {name: torch.stack([masks[t] for t in items.tasks]) for name, items in self.sets.items()}

    # part -> (eval set, scored within the item's task?)
    PARTS = {
        "validation": ("validation", True), "validation_seen": ("validation_seen", True), "validation_all": ("validation", False),
        "test": ("test", True), "seen": ("seen", True), "test_all": ("test", False), "training": ("training", True),
    }  # fmt: skip

    def score(self, folder: Path | None, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """{part: 0/1 per item} for the model with adapter `folder` (None: the in-memory model as it is)."""
        sims, results = {}, {}
        for part in parts:
            name, within = self.PARTS[part]
            if name not in sims:
                sims[name] = client.similarities(self.encoder, folder, list(self.sets[name].texts), self.matrix)
            scores = sims[name].masked_fill(~self.within[name], float("-inf")) if within else sims[name]
            results[part] = (scores.argmax(1) == self.gold[name]).float()
        return results


def client_data(federation: tasks.Federation, encoder: client.Encoder, clients) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(texts, gold label indices, label matrix) of some clients' training items, against their own items' labels."""
    texts = [t for c in clients for t in c.items.texts]
    labels = sorted({x for c in clients for x in c.items.labels})
    index = {label: i for i, label in enumerate(labels)}
    return texts, torch.tensor([index[x] for c in clients for x in c.items.labels]), encoder.labels(labels)




def run(variant: Variant, federation: tasks.Federation, ranks: list[int], lr: float, settings: Settings,
        encoder: client.Encoder, scorer: Scorer, work: Path) -> dict:  # fmt: skip
    """One federation; returns the record that results.json keeps."""
    started = time.perf_counter()
    seed, count = federation.seed, len(federation.clients)
    r_min = min(ranks)  # the smallest client rank of the distribution: the energy share is measured at it
    ranks = {"own": list(ranks), "min": [min(ranks)] * count, "max": [R_MAX] * count}[variant.ranks]
    if variant.name == "centralised":
        return _centralised(federation, lr, settings, encoder, scorer, work, r_min, started)
    data = [client_data(federation, encoder, [c]) for c in federation.clients]
    starts = _Starts(variant, encoder, seed, work)
    record = {"ranks": list(ranks), "lr": lr, "rounds": [], "energy": [], "train_loss": [], "prunes": [], "server_seconds": 0.0}
    curves = {part: [] for part in EVAL_PARTS}
    own: dict[int, Path] = {}  # local training: each client's last upload
    base = server.write_base(encoder, work / "base-0") if variant.start == "fold" else None
    evaluated = None
    for round_ in range(1, settings.rounds + 1):
        chosen = tasks.participants(seed, round_, count, settings.per_round)
        starts.new_round(round_)
        uploads, losses, prunes = [], [], 0
        for k in chosen:
            name = federation.clients[k].name
            source = own.get(k) if variant.start == "own" and k in own else starts.adapter(name, ranks[k])
            upload = work / f"r{round_}" / "clients" / name
            trained = client.train(encoder, source, upload, *data[k], steps=settings.steps, batch_size=settings.batch_size,
                                   lr=lr, seed=100_000 * seed + 100 * round_ + k, pruning=SELF_PRUNING if variant.pruning else None)  # fmt: skip
            losses.append(trained.loss)
            if trained.rank < ranks[k]:
                prunes += 1
                ranks[k] = trained.rank
            uploads.append((name, upload))
            own[k] = upload
        record["train_loss"].append(sum(losses) / len(losses))
        record["prunes"].append(prunes)
        if variant.method is not None:
            clock = time.perf_counter()
            out = work / f"r{round_}" / "server"
            weights = None if variant.privacy else [len(data[k][0]) for k in chosen]  # DP needs public weights: uniform
            report = server.aggregate(variant.method, uploads, weights, out, balanced=variant.balanced, cli=round_ <= settings.cli_rounds,
                                      privacy=_privacy(variant, seed, round_, count, settings, work))  # fmt: skip
            _trust(record, report)
            record.setdefault("cli_rounds", []).extend([round_] if round_ <= settings.cli_rounds else [])
            record["energy"].append(server.energy_share(out / server.GLOBAL, r_min))
            if base is not None:
                base = server.fold(base, out / server.GLOBAL, work / f"r{round_}")
                server.load_base(encoder, base)
            record["server_seconds"] += time.perf_counter() - clock
            starts.served(out, [federation.clients[k].name for k in chosen])
        last = round_ == settings.rounds
        if variant.name == "local":
            if last:  # each client's own model, mean over a fixed subset of clients (every round would cost too much)
                evaluated = _local_scores(scorer, [own.get(k) for k in range(settings.local_eval_clients)], scorer.parts)
                _append(record, curves, round_, evaluated)
            continue
        if round_ % settings.eval_every == 0 or last:
            folder = None if base is not None else starts.last_out / server.GLOBAL
            evaluated = scorer.score(folder, scorer.parts if last else EVAL_PARTS)
            _append(record, curves, round_, evaluated)
    if base is not None:
        encoder.load_top(None)
    record["final_ranks"] = list(ranks)
    record.update(curves=curves, final={part: evaluated[part].tolist() for part in scorer.parts},
                  seconds=time.perf_counter() - started)  # fmt: skip
    return record


class _Starts:
    """Where a sampled client starts a round, per method (server.py's module docstring says why)."""

    def __init__(self, variant: Variant, encoder: client.Encoder, seed: int, work: Path):
        self.variant, self.encoder, self.seed, self.work = variant, encoder, seed, work
        self.initial = client.initial_factors(encoder, R_MAX, seed)  # round 1: one seeded draw for every client
        self.last_out: Path | None = None  # the last server round's OUT
        self.last_participants: set[str] = set()
        self.round, self.cache = 0, {}

    def new_round(self, round_: int) -> None:
        self.round, self.cache = round_, {}  # per rank: this round's start for clients without their own

    def served(self, out: Path, participants: list[str]) -> None:
        self.last_out, self.last_participants = out, set(participants)

    def adapter(self, name: str, rank: int) -> Path:
        if self.variant.start == "fold":  # FLoRA: a fresh LoRA every round (a new draw, B = 0) on the folded base
            return self._per_rank(rank, "fresh", lambda folder: client.write_adapter(self.encoder, folder, rank, self._fresh()))
        if self.last_out is None or self.variant.start == "own":
            return self._per_rank(rank, "init", lambda folder: client.write_adapter(self.encoder, folder, rank, self.initial))
        if name in self.last_participants:
            return self.last_out / name  # the server's OUT/<client>/
        global_ = self.last_out / server.GLOBAL
        if self.variant.start == "split":
            return self._per_rank(rank, "split", lambda folder: server.split_to(global_, rank, folder, balanced=self.variant.balanced))
        return self._per_rank(rank, "first", lambda folder: server.first_columns(self.encoder, global_, rank, self.initial, folder))

    def _per_rank(self, rank: int, kind: str, make) -> Path:
        if rank not in self.cache:
            folder = self.work / f"r{self.round}" / "start" / f"{kind}-{rank}"
            self.cache[rank] = make(folder) or folder
        return self.cache[rank]

    def _fresh(self):
        if "fresh" not in self.cache:
            self.cache["fresh"] = client.initial_factors(self.encoder, R_MAX, 1000 * self.seed + self.round)
        return self.cache["fresh"]


def _privacy(variant: Variant, seed: int, round_: int, count: int, settings: Settings, work: Path) -> dict | None:
    """The DP settings of a round: clip, noise, the run's ledger, the sampling rate.

    The noise is seeded so that a run is reproducible, with a new seed every round: flexlora seeds a module's
    noise by (--seed, module name) only, so one seed for every round would add the same noise each round
    (correlated, not what the accountant assumes). A real federation leaves --seed out (the OS's secure source).
    """
    if variant.privacy is None:
        return None
    clip, noise = variant.privacy
    return {"clip": clip, "noise": noise, "sampling_rate": min(1.0, settings.per_round / count), "ledger": work / "dp-ledger.json",
            "delta": DP_DELTA, "seed": 100_000 * seed + round_}  # fmt: skip


def _trust(record: dict, report: dict) -> None:
    """Keep what the round's report says about trust: each upload's update norm ||s B A||_F (all modules;
    what --clip bounds), how many were clipped, and under DP the (epsilon, delta) of the ledger so far."""
    clients = report.get("clients") or []
    known = bool(clients) and all(c.get("update_norm") is not None for c in clients)  # per round; None where not reported
    record.setdefault("client_norms", []).append([round(float(c["update_norm"]), 6) for c in clients] if known else None)
    record.setdefault("clipped", []).append(sum(bool(c.get("clipped")) for c in clients) if known else None)
    if report.get("privacy"):
        private = report["privacy"]
        record["privacy"] = {k: private[k] for k in ("clip", "noise_multiplier", "noise_std", "sampling_rate", "rounds", "delta", "epsilon",
                                                     "accountant", "weights", "max_weight")}  # fmt: skip
        record.setdefault("epsilon", []).append(private["epsilon"])


def _centralised(federation, lr, settings, encoder, scorer, work, r_min, started) -> dict:
    """One model at r_max on every training client's data, the same number of samples as a federation."""
    from peft import PeftModel

    texts, gold, train_matrix = client_data(federation, encoder, federation.clients)
    # Each item is scored among its own client's labels, as on that client.
    labels = sorted({x for c in federation.clients for x in c.items.labels})
    index = {label: i for i, label in enumerate(labels)}
    allowed = torch.zeros(len(texts), len(labels), dtype=torch.bool)
    row = 0
    for c in federation.clients:
        own = [index[x] for x in set(c.items.labels)]
        allowed[row : row + len(c.items.texts), own] = True
        row += len(c.items.texts)
    start = work / "init" / f"rank-{R_MAX}"
    client.write_adapter(encoder, start, R_MAX, client.initial_factors(encoder, R_MAX, federation.seed))
    model = PeftModel.from_pretrained(encoder.model, str(start), is_trainable=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)  # as the clients (client.train)
    generator = torch.Generator().manual_seed(100_000 * federation.seed)
    record = {"ranks": [R_MAX], "lr": lr, "rounds": [], "energy": [], "train_loss": [], "prunes": [], "server_seconds": 0.0}
    curves = {part: [] for part in EVAL_PARTS}
    evaluated = None
    for round_ in range(1, settings.rounds + 1):
        loss = client.train_centrally(encoder, model, optimizer, texts, gold, train_matrix, allowed, steps=settings.per_round * settings.steps,
                                      batch_size=settings.batch_size, generator=generator)  # fmt: skip
        record["train_loss"].append(loss)
        last = round_ == settings.rounds
        if round_ % settings.eval_every == 0 or last:
            folder = work / f"r{round_}" / "model"
            model.save_pretrained(str(folder))
            record["energy"].append(server.energy_share(folder, r_min))
            evaluated = scorer.score(None, scorer.parts if last else EVAL_PARTS)  # encoder.model carries the LoRA layers
            _append(record, curves, round_, evaluated)
    encoder.model = model.unload()
    record.update(final_ranks=[R_MAX], curves=curves, final={part: evaluated[part].tolist() for part in scorer.parts},
                  seconds=time.perf_counter() - started)  # fmt: skip
    return record


def _local_scores(scorer: Scorer, folders: list[Path | None], parts) -> dict[str, torch.Tensor]:
    """Mean over clients of each client's own model's correctness (a client that never trained: the base model)."""
    total = None
    for folder in folders:
        scores = scorer.score(folder, parts)
        total = scores if total is None else {k: total[k] + scores[k] for k in parts}
    return {k: v / len(folders) for k, v in total.items()}


def validation_score(record: dict) -> float:
    """What chooses a learning rate: the last round's mean of the unseen validation tasks' accuracy and the
    clients' tasks' held-out validation accuracy."""
    return (record["curves"]["validation"][-1] + record["curves"]["validation_seen"][-1]) / 2


def _append(record: dict, curves: dict, round_: int, evaluated: dict) -> None:
    record["rounds"].append(round_)
    for part in EVAL_PARTS:
        curves[part].append(float(evaluated[part].mean()))
