"""Real text that is on every machine: the Python standard library's docstrings, labelled by module.

Each item is the first paragraph of a docstring, its label the module it documents, e.g.
"Put an item into the queue without blocking." -> "asyncio". The documented name is masked so
the task is to understand the description. A module is a task: each training client holds the
docstrings of a few modules (non-IID, as the paper's per-task clients). Held-out clients hold
docstrings that no client trained on, mixing modules that different training clients know, so
only a model that has learned from every client can label them all.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import random
import re
import warnings
from dataclasses import dataclass

# Portable modules that import everywhere (no platform-only or deprecated ones), each with a
# dozen or more documented functions, classes and methods.
MODULES = (
    "argparse", "array", "ast", "asyncio", "base64", "binascii", "bz2", "calendar", "cmath", "cmd",
    "code", "codecs", "collections", "configparser", "contextlib", "ctypes", "datetime", "decimal",
    "difflib", "dis", "doctest", "enum", "ftplib", "gc", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "os", "pathlib",
    "pickletools", "platform", "poplib", "queue", "random", "re", "selectors", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "subprocess", "symtable", "sys",
    "tarfile", "threading", "time", "traceback", "tracemalloc", "typing", "unicodedata", "unittest",
    "zipfile",
)  # fmt: skip


@dataclass(frozen=True)
class Item:
    text: str  # what the docstring says, the documented name masked
    label: str  # the module, e.g. "asyncio"


@dataclass(frozen=True)
class Client:
    name: str
    items: tuple[Item, ...]

    @property
    def modules(self) -> list[str]:
        return sorted({item.label for item in self.items})


@dataclass(frozen=True)
class Federation:
    clients: list[Client]  # the training clients
    heldout: list[Client]  # unseen clients, for evaluation only
    labels: list[str]  # every module any client holds: the classes


def module_items(module_name: str, limit: int) -> list[Item]:
    """Up to `limit` documented public callables of one module, in a stable order."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except Exception:  # a module this Python lacks (e.g. built without ssl) is simply skipped
        return []
    items = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _own(obj, module_name):
            continue
        items += _item(module_name, name, obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    items += _item(module_name, attr, member)
    return items[:limit]


def make_federation(
    seed: int, clients: int, modules_per_client: int, items_per_module: int, heldout_clients: int, heldout_share: float = 0.3
) -> Federation:
    """Pick modules at random (by seed), deal them out to clients, keep a share of each module unseen."""
    usable = [m for m in MODULES if len(module_items(m, items_per_module)) >= min(items_per_module, 20)]
    needed = clients * modules_per_client
    if needed > len(usable):
        raise SystemExit(f"asked for {needed} modules but only {len(usable)} are usable on this Python")
    rng = random.Random(seed)
    labels = rng.sample(usable, needed)
    train, unseen = {}, {}
    for module in labels:
        items = module_items(module, items_per_module)
        rng.shuffle(items)
        cut = max(1, round(len(items) * heldout_share))
        unseen[module], train[module] = items[:cut], items[cut:]
    federation = [
        Client(f"client-{i}", tuple(x for m in labels[i * modules_per_client : (i + 1) * modules_per_client] for x in train[m]))
        for i in range(clients)
    ]
    # Module j goes to held-out client j mod H: each mixes modules that different training clients hold.
    heldout = [
        Client(f"heldout-{h}", tuple(x for j, m in enumerate(labels) if j % heldout_clients == h for x in unseen[m]))
        for h in range(heldout_clients)
    ]
    return Federation(federation, heldout, sorted(labels))


def _own(obj, module_name: str) -> bool:
    """Defined in this module (or its package), not merely imported into it."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
        return False
    owner = getattr(obj, "__module__", None) or ""
    return owner == module_name or owner.startswith(module_name + ".") or owner == "_" + module_name


def _item(module_name: str, short: str, obj) -> list[Item]:
    doc = inspect.getdoc(obj)
    if not doc:
        return []
    paragraph = _first_paragraph(doc, short)
    masked = re.sub(rf"\b{re.escape(short)}\b", "this", paragraph, flags=re.IGNORECASE)
    if len(masked.split()) < 3:
        return []
    return [Item(masked, module_name)]


def _first_paragraph(doc: str, short: str) -> str:
    """The first paragraph that is prose, not a C-style signature line such as `f(x) -> y`."""
    for paragraph in doc.split("\n\n"):
        lines = [line for line in paragraph.splitlines() if not re.match(rf"\s*{re.escape(short)}\s*\(", line)]
        text = " ".join(" ".join(lines).split())
        if text:
            return text
    return ""
