"""One seed's federation: which modules (tasks) train, validate and test; client ranks; who takes part when.

A task is a module: name its functions, classes and methods from their docstrings. An item is scored
by the name embeddings of the frozen label tower (client.py): it is right when its own name is the
closest, among the names of its task ("within its task") or among every name of the seed ("among all
names": every task's, seen and unseen).

Every seed redraws all of it. The corpus's modules are shuffled and cut into three disjoint groups:
one task per training client, the validation tasks (for choosing learning rates) and the test tasks
(the headline). No client ever sees a validation or test module's text or names: those are unseen
tasks, as in the paper's evaluation. Two shares of each training task's items are held out as well
(one for validation, one for test), to measure how well the federation learned its clients' tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from corpus import name_words

# Five rank levels 20x apart, the paper's 8, 16, 30, 100, 200 (for a much wider model) scaled by
# 1/10 for MiniLM's width of 384; and the share of clients at each level in each distribution.
RANK_LEVELS = (1, 2, 3, 10, 20)
DISTRIBUTIONS = {
    "heavy-tail-light": (0.4, 0.3, 0.15, 0.1, 0.05),  # most clients small, few large
    "uniform": (0.2, 0.2, 0.2, 0.2, 0.2),
    "normal": (0.1, 0.2, 0.4, 0.2, 0.1),
    "heavy-tail-strong": (0.05, 0.1, 0.15, 0.3, 0.4),  # most clients large
}


@dataclass(frozen=True)
class Items:
    texts: tuple[str, ...]
    labels: tuple[str, ...]  # each text's label: the words of the name it documents ("queue put nowait")
    tasks: tuple[str, ...]  # each text's task (module)


@dataclass(frozen=True)
class Client:
    name: str
    task: str
    items: Items  # what it trains on


@dataclass(frozen=True)
class Federation:
    seed: int
    clients: tuple[Client, ...]
    validation: Items  # unseen validation tasks
    test: Items  # unseen test tasks
    validation_seen: Items  # held-out items of the training tasks, for validation
    seen: Items  # other held-out items of the training tasks, for test
    candidates: dict[str, tuple[str, ...]]  # task -> the labels its items are scored among (sorted)
    train_tasks: tuple[str, ...]
    validation_tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]

    def eval_sets(self) -> dict[str, Items]:
        return {"validation": self.validation, "validation_seen": self.validation_seen, "test": self.test, "seen": self.seen}

    def all_texts(self) -> list[str]:
        return [t for c in self.clients for t in c.items.texts] + [t for e in self.eval_sets().values() for t in e.texts]

    def all_labels(self) -> list[str]:
        """Every task's labels, seen and unseen, once each (sorted)."""
        return sorted({label for labels in self.candidates.values() for label in labels})


def make_federation(corpus: dict[str, list[list[str]]], seed: int, clients: int, validation_tasks: int, test_tasks: int,
                    items_per_task: int, eval_items: int, held_out_share: float = 0.15) -> Federation:  # fmt: skip
    """Draw a seed's tasks and items from the corpus (see the module docstring)."""
    needed = clients + validation_tasks + test_tasks
    if needed > len(corpus):
        raise SystemExit(f"asked for {needed} tasks but the corpus has {len(corpus)}")
    rng = random.Random(seed)
    order = sorted(corpus)
    rng.shuffle(order)
    train, validation, test = order[:clients], order[clients : clients + validation_tasks], order[clients + validation_tasks : needed]
    members, seen, validation_seen, candidates = [], [], [], {}
    for index, task in enumerate(train):
        drawn = [(text, name_words(name), task) for text, name in rng.sample(corpus[task], min(items_per_task, len(corpus[task])))]
        cut = max(1, round(held_out_share * len(drawn)))
        seen += drawn[:cut]
        validation_seen += drawn[cut : 2 * cut]
        members.append(Client(f"client-{index:02d}", task, _items(drawn[2 * cut :])))
        candidates[task] = tuple(sorted({label for _, label, _ in drawn}))
    unseen = {}
    for task in validation + test:
        unseen[task] = [(text, name_words(name), task) for text, name in rng.sample(corpus[task], min(eval_items, len(corpus[task])))]
        candidates[task] = tuple(sorted({label for _, label, _ in unseen[task]}))
    return Federation(
        seed=seed,
        clients=tuple(members),
        validation=_items([item for task in validation for item in unseen[task]]),
        test=_items([item for task in test for item in unseen[task]]),
        validation_seen=_items(validation_seen),
        seen=_items(seen),
        candidates=candidates,
        train_tasks=tuple(train),
        validation_tasks=tuple(validation),
        test_tasks=tuple(test),
    )


def _items(triples) -> Items:
    return Items(tuple(t for t, _, _ in triples), tuple(label for _, label, _ in triples), tuple(task for _, _, task in triples))


def client_ranks(distribution: str, count: int, seed: int) -> list[int]:
    """Ranks for `count` clients in the distribution's proportions (largest remainder), shuffled by seed."""
    shares = DISTRIBUTIONS[distribution]
    exact = [share * count for share in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (exact[i] - counts[i], i), reverse=True)
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    ranks = [level for level, n in zip(RANK_LEVELS, counts) for _ in range(n)]
    random.Random(f"ranks-{distribution}-{seed}").shuffle(ranks)
    return ranks


def participants(seed: int, round_: int, clients: int, per_round: int) -> list[int]:
    """The clients sampled in a round (uniformly, without replacement): the same for every method of a seed."""
    return sorted(random.Random(f"round-{seed}-{round_}").sample(range(clients), min(per_round, clients)))
