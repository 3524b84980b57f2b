"""Real text that is on every machine with this example's dependencies: docstrings and the names they document.

Each item is the first paragraph of a docstring and the name it documents, e.g. "Put an item into
the queue without this." -> `Queue.put_nowait` (the documented name is masked in the text). A module
is a task: name its functions, classes and methods from their descriptions. The sources are the
Python standard library and the scientific packages installed with the example (numpy, scipy,
scikit-learn, torch, sympy, networkx, matplotlib), as modules of two levels at most ("scipy.stats",
"torch.nn", "email.message"): about 140 tasks with enough items.

Building it imports those packages (about a minute once), so the corpus is cached as JSON, keyed by
the Python and package versions (`corpus_path`). It is deterministic: the same versions give the
same file, byte for byte.

Cleaning, so that a label is never given away and no item is scored twice:
- the documented name is masked ("this"), and an item whose text still names its label is dropped
  (the name's words, e.g. "put nowait" for `put_nowait`);
- texts are deduplicated (case, spacing and punctuation ignored): a text that documents two names
  (in one module or two) is dropped everywhere, and a task keeps one item per name;
- items shorter than 5 words are dropped; a submodule with fewer than `MIN_ITEMS` items left joins its
  package's task, and a task with fewer than that is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

CORPUS_VERSION = 2  # bump when the extraction below changes
MIN_ITEMS = 24  # a module needs this many clean items to be a task
MAX_WORDS = 40  # longer paragraphs are cut (the model reads 32 tokens)

# Standard-library modules (and packages, whose public submodules are walked one level down) that
# import everywhere without side effects; platform-only, deprecated and interactive ones are left out.
STDLIB = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "bz2", "calendar", "cmath",
    "cmd", "code", "codecs", "collections", "colorsys", "concurrent", "configparser", "contextlib", "contextvars",
    "copy", "csv", "ctypes", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "mmap", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "symtable", "sys", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest",
    "urllib", "uuid", "warnings", "wave", "weakref", "wsgiref", "xml", "xmlrpc", "zipfile", "zipimport", "zlib",
    "zoneinfo",
)  # fmt: skip
PACKAGES = ("numpy", "scipy", "sklearn", "torch", "sympy", "networkx", "matplotlib")
DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # import name -> distribution name, where they differ
SKIPPED_PARTS = ("tests", "test", "testing", "conftest", "setup", "distutils", "f2py", "externals")

Corpus = dict[str, list[list[str]]]  # task (module) -> [text, name] items, sorted


def load(cache_dir: str | Path | None = None) -> Corpus:
    """The corpus for this Python and these package versions, built once and then read from the cache."""
    path = corpus_path(cache_dir)
    if not path.is_file():
        # Built in a fresh interpreter: what this process imported matters (transformers, once imported, adds
        # documented methods to logging.Logger), and the corpus must depend on the versions alone.
        subprocess.run([sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--write", str(path)], check=True)
    return json.loads(path.read_text(encoding="utf-8"))["modules"]


def _write(path: Path) -> None:
    modules = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"version": CORPUS_VERSION, "sources": sources(), "modules": modules}
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # two workers may build at once
    temporary.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


def corpus_path(cache_dir: str | Path | None = None) -> Path:
    folder = Path(cache_dir or os.environ.get("FLEXLORA_EXAMPLE_CACHE") or Path.home() / ".cache" / "flexlora-example")
    key = hashlib.sha256(json.dumps([CORPUS_VERSION, sources()], sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"corpus-{key}.json"


def sources() -> dict[str, str]:
    """What the corpus is made of: the Python version and each package's version."""
    found = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(DISTRIBUTIONS.get(package, package))
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def fingerprint(corpus: Corpus) -> str:
    """A short hash of the corpus's content, recorded with results."""
    return hashlib.sha256(json.dumps(corpus, sort_keys=True).encode()).hexdigest()[:16]


def build() -> Corpus:
    """Extract, clean and deduplicate every source's docstrings (see the module docstring)."""
    owners: dict[int, tuple[str, object]] = {}  # id(object) -> (label, object): each object counted once
    for top in (*STDLIB, *(p for p in PACKAGES if sources()[p] != "missing")):
        for label, module in _public_modules(top):
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or not _documentable(obj, top):
                    continue
                previous = owners.get(id(obj))
                if previous is None or _closeness(label, obj) > _closeness(previous[0], obj):
                    owners[id(obj)] = (label, obj)
    raw: dict[str, list[tuple[str, str]]] = {}
    for label, obj in owners.values():
        for name, short, documented in _documented(obj):
            text = _clean(documented.__doc__, short)
            if text and not _names_itself(text, name):
                raw.setdefault(label, []).append((text, name))
    return _deduplicate(raw)


def _public_modules(top: str):
    """(label, module) for a package or module and its public submodules one level down, in name order."""
    module = _import(top)
    if module is None:
        return
    yield top, module
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", None) or []), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in SKIPPED_PARTS:
            continue
        child = _import(f"{top}.{info.name}")
        if child is not None:
            yield f"{top}.{info.name}", child


def _import(name: str):
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # a module this install lacks or cannot import (optional backends) is simply skipped
        return None


def _documentable(obj, top: str) -> bool:
    """A public function or class of this package (not merely imported into it from elsewhere)."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj) or type(obj).__name__ == "ufunc"):
        return False
    owner = getattr(obj, "__module__", None) or ""
    return owner == top or owner.startswith(top + ".") or owner.lstrip("_") == top


def _closeness(label: str, obj) -> tuple[int, int]:
    """How well a public module names where an object lives: shared leading parts of the dotted names
    (more is better), then fewer parts (the public name, not a re-export deeper down)."""
    owner = (getattr(obj, "__module__", None) or "").split(".")
    parts = label.split(".")
    shared = 0
    for a, b in zip(parts, owner):
        if a != b:
            break
        shared += 1
    return shared, -len(parts)


def _documented(obj):
    """(name, short name, object) for the object and, for a class, its public methods (`Class.method`),
    each with its own docstring."""
    own = getattr(obj, "__name__", "")
    if obj.__doc__ and own:
        yield own, own, obj
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            member = getattr(member, "__func__", member)  # classmethod/staticmethod
            if not attr.startswith("_") and callable(member) and isinstance(getattr(member, "__doc__", None), str):
                yield f"{own}.{attr}", attr, member


def _clean(doc: str | None, short: str) -> str:
    """The first prose paragraph, markup removed, the documented name masked; '' if too short."""
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    for paragraph in doc.split("\n\n"):
        lines = [line for line in paragraph.splitlines() if not re.match(r"\s*[\w.]+\s*\(.*\)\s*(->.*)?$", line)]
        text = " ".join(" ".join(lines).split())
        if text:
            break
    else:
        return ""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)  # :func:`foo` -> foo
    text = text.replace("``", "").replace("`", "")
    if short:
        text = re.sub(rf"\b{re.escape(short)}\b", "this", text, flags=re.IGNORECASE)
    words = text.split()
    if len(words) < 5:
        return ""
    return " ".join(words[:MAX_WORDS])


def name_words(name: str) -> str:
    """A name as the words it is made of: `Queue.put_nowait` -> "queue put nowait", `getLogger` -> "get logger"."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ").replace(".", " ")
    return " ".join(spaced.split()).lower()


def _names_itself(text: str, name: str) -> bool:
    """The text still gives its name away: the short name's words, in order (e.g. "put nowait")."""
    words = name_words(name.rsplit(".", 1)[-1])
    return bool(words) and re.search(rf"(?<![\w]){re.escape(words)}(?![\w])", " ".join(re.split(r"[\W_]+", text)).lower()) is not None


def _deduplicate(raw: dict[str, list[tuple[str, str]]]) -> Corpus:
    owners: dict[str, set[tuple[str, str]]] = {}  # normalized text -> every (task, name) it documents
    for label, items in raw.items():
        for text, name in items:
            owners.setdefault(_key(text), set()).add((label, name))
    kept: dict[str, dict[str, tuple[str, str]]] = {}  # task -> name -> (text, name): one item per name
    for label in sorted(raw):
        for text, name in sorted(raw[label], key=lambda item: (item[1], _key(item[0]), item[0])):
            if len(owners[_key(text)]) == 1:  # a text with two labels is ambiguous: dropped everywhere
                kept.setdefault(label, {}).setdefault(name, (text, name))
    # A submodule too small to be a task joins its package's task (asyncio.queues -> asyncio).
    for label in sorted(kept):
        top = label.split(".")[0]
        if top != label and len(kept[label]) < MIN_ITEMS:
            merged = kept.setdefault(top, {})
            for name, item in kept.pop(label).items():
                merged.setdefault(name, item)
    return {label: [list(item) for _, item in sorted(items.items())] for label, items in sorted(kept.items()) if len(items) >= MIN_ITEMS}


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


if __name__ == "__main__":  # python corpus.py: build (or read) the corpus and describe it
    if sys.argv[1:2] == ["--write"]:  # what load() runs in a fresh interpreter
        _write(Path(sys.argv[2]))
        sys.exit()
    corpus = load()
    print(f"{corpus_path()}: {len(corpus)} tasks, {sum(map(len, corpus.values()))} items, fingerprint {fingerprint(corpus)}")
    for label, items in corpus.items():
        print(f"{len(items):5}  {label:24}  {items[0][1]:30}  {items[0][0][:70]}")
