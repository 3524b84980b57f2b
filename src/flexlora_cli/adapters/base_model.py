"""Base models as transformers writes them: safetensors weights (one file, or shards and an index) beside
config, tokenizer and other files. Read lazily, written shard by shard.

A base model is a local folder, or a Hub reference (see adapters/hub.py) of which only the safetensors
weights and the top-level files beside them are downloaded; the offline cache is honoured.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flexlora_cli.adapters import hub
from flexlora_cli.adapters.tensors import TensorFile, TensorInfo
from flexlora_cli.errors import AdapterError

# Weights in formats other than safetensors: never copied (they would hold the unfolded base).
OTHER_WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".tflite", ".ot", ".npz",
)
_CONVERT_HINT = "load it with transformers and save_pretrained() it, which writes safetensors"

# Called after each shard is written: (shards done, shards in all, shard file name).
ShardProgress = Callable[[int, int, str], None]


@dataclass
class BaseModel:
    """A transformers model folder whose tensors stay on disk until written."""

    source: str  # what the user passed: a folder, or a Hub reference
    folder: Path  # local folder (for a Hub reference: the snapshot in the cache)
    shards: dict[str, TensorFile]  # weight file name -> the file, indexed from its header
    tensors: dict[str, TensorInfo]  # every tensor of every shard: shape and dtype
    other_files: list[str]  # top-level files copied unchanged (config, tokenizer, the index, ...)
    skipped: list[str]  # weights in other formats and subfolders: not copied
    config: dict = field(default_factory=dict)  # config.json
    provenance: dict = field(default_factory=dict)  # Hub repo, revision and commit

    @property
    def name(self) -> str:
        """The model's name as an adapter would record it: the Hub repo id, or the folder's name."""
        return self.provenance.get("repo_id") or self.folder.resolve().name

    def find(self, parameter: str) -> str | None:
        """The checkpoint key of a parameter path such as "model.layers.0.self_attn.q_proj.weight".

        Checkpoints of the same architecture differ by the base-model prefix: GPT-2's Hub weights say
        "h.0.attn.c_attn.weight" where GPT2LMHeadModel (and so a PEFT adapter) says
        "transformer.h.0.attn.c_attn.weight", and an adapter trained on the bare model lacks the prefix
        that a checkpoint with a head has. Tried in order: the path itself, the path without its first
        part, the one key that ends with ".<path>". None if none matches.
        """
        if parameter in self.tensors:
            return parameter
        _, _, rest = parameter.partition(".")
        if rest and rest in self.tensors:
            return rest
        ending = "." + parameter
        matches = [key for key in self.tensors if key.endswith(ending)]
        return matches[0] if len(matches) == 1 else None

    @property
    def ties_embeddings(self) -> bool:
        """Whether the output embeddings share the input embeddings' weight (and so are not stored)."""
        configs = [self.config, self.config.get("text_config") or {}]
        return any(c.get("tie_word_embeddings") for c in configs if isinstance(c, dict))


def open_base_model(spec: str | Path) -> BaseModel:
    """Index a base model from a local folder or a Hub reference (a local path always wins).

    Raises AdapterError (one line) for a missing folder, missing or unreadable weights, or a Hub failure.
    """
    text = str(spec)
    ref = None if Path(text).exists() else hub.parse_ref(text)
    if ref is None:
        return read_base_model(Path(text), text)
    folder, provenance = download_base_model(ref, text)
    model = read_base_model(folder, text)
    model.provenance = provenance
    return model


def read_base_model(folder: Path, source: str | None = None) -> BaseModel:
    """Index a local transformers model folder: its safetensors weights from their headers, its other files."""
    source = source or str(folder)
    if not folder.exists():
        raise AdapterError(source, "no such file or folder")
    if not folder.is_dir():
        raise AdapterError(source, f"not a folder; expected a transformers model folder with {SAFETENSORS_SINGLE_FILE}")
    weight_map = None  # transformers' order: model.safetensors, else the index and its shards
    if (folder / SAFETENSORS_SINGLE_FILE).is_file():
        weight_files = [SAFETENSORS_SINGLE_FILE]
    elif (folder / SAFETENSORS_INDEX_FILE).is_file():
        weight_map = _weight_map(folder / SAFETENSORS_INDEX_FILE)
        weight_files = sorted(set(weight_map.values()))
    else:
        others = sorted(p.name for p in folder.iterdir() if p.name.endswith(OTHER_WEIGHT_SUFFIXES))
        found = f"; found only {', '.join(others)}" if others else ""
        raise AdapterError(
            source, f"no safetensors weights ({SAFETENSORS_SINGLE_FILE} or {SAFETENSORS_INDEX_FILE}){found}",
            hint=_CONVERT_HINT if others else None,
        )
    shards, tensors = {}, {}
    for name in weight_files:
        shards[name] = _open_shard(folder / name)
        for key, info in shards[name].index.items():
            if key in tensors:
                raise AdapterError(folder / name, f"tensor {key} is also in another weight file of {source}")
            tensors[key] = info
    if weight_map is not None:
        _check_index(folder / SAFETENSORS_INDEX_FILE, weight_map, shards)
    other_files, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name in shards:
            continue  # hidden entries are tools' state (.cache, .git), not the model
        if path.is_file() and not path.name.endswith((".safetensors", *OTHER_WEIGHT_SUFFIXES)):
            other_files.append(path.name)
        else:
            skipped.append(path.name + ("/" if path.is_dir() else ""))
    return BaseModel(source, folder, shards, tensors, other_files, skipped, _read_config(folder))


def download_base_model(ref: hub.HubRef, spec: str) -> tuple[Path, dict]:
    """Fetch a model's safetensors weights and the files beside them (not other weight formats, not
    subfolders), or find them in the cache; return the folder and provenance.

    Two steps, each a snapshot_download, so that only the weights this model uses come down: first the
    small files (the index among them), then the shards the index names (or model.safetensors).
    """
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    skip_weights = [prefix + "*" + suffix for suffix in (".safetensors", *OTHER_WEIGHT_SUFFIXES)]
    snapshot = _snapshot(ref, spec, allow=[prefix + "*"], ignore=[prefix + "*/*", *skip_weights])
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    index = folder / SAFETENSORS_INDEX_FILE
    shards = sorted(set(_weight_map(index).values())) if index.is_file() else [SAFETENSORS_SINGLE_FILE]
    _snapshot(ref, spec, allow=[prefix + name for name in shards], ignore=None)
    commit = snapshot.name
    provenance = {
        "repo_id": ref.repo_id,
        "repo_type": ref.repo_type,
        "revision": ref.revision or "main",
        "commit": commit if hub._COMMIT_HASH.match(commit) else None,
        "subfolder": ref.subfolder or None,
    }
    return folder, provenance


def _snapshot(ref: hub.HubRef, spec: str, allow: list[str], ignore: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    settings = hub.settings()
    try:
        return Path(
            snapshot_download(
                ref.repo_id,
                repo_type=ref.repo_type,
                revision=ref.revision,
                allow_patterns=allow,
                ignore_patterns=ignore,
                cache_dir=settings.cache_dir,
                endpoint=settings.endpoint,
                token=settings.token,
                local_files_only=settings.offline,
                tqdm_class=None if sys.stderr.isatty() else hub._silent_bar(),
            )
        )
    except Exception as error:
        raise hub._as_flexlora_error(error, spec, ref, settings, action="read") from None


def write_base_model(
    model: BaseModel,
    folder: Path,
    edit: Callable[[str, torch.Tensor], torch.Tensor],
    edited: Collection[str],
    progress: ShardProgress | None = None,
) -> list[dict]:
    """Write `model` into `folder` with `edit(key, tensor)` applied to the tensors named in `edited`.

    One shard at a time: a shard holding an edited tensor is read whole, edited and written again (same
    file name, same keys); any other shard, the index and the other files are copied byte for byte.
    Returns one record per shard: file, tensor count, edited keys.
    """
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for done, (name, shard) in enumerate(model.shards.items(), start=1):
        changed = [key for key in shard.index if key in edited]
        if changed:
            tensors = _read_shard(shard)
            for key in changed:
                tensors[key] = edit(key, tensors[key]).contiguous()
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            del tensors
        else:
            shutil.copyfile(shard.path, folder / name)
        records.append({"file": name, "tensors": len(shard.index), "edited": changed})
        if progress:
            progress(done, len(model.shards), name)
    for name in model.other_files:
        shutil.copyfile(model.folder / name, folder / name)
    return records


def _read_shard(shard: TensorFile) -> dict[str, torch.Tensor]:
    """Every tensor of one weight file, as stored (not checked: the base's values are the user's)."""
    try:
        with safe_open(shard.path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in shard.index}
    except (SafetensorError, OSError) as error:
        raise AdapterError(shard.path, f"cannot read: {error}") from None


def _open_shard(path: Path) -> TensorFile:
    if not path.is_file():
        raise AdapterError(path, "missing: the index names this weight file but the folder does not hold it")
    return TensorFile(path)


def _weight_map(path: Path) -> dict[str, str]:
    """An index's tensor name -> weight file map; the weight files must be plain .safetensors names beside it."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(path, f"cannot read the index: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise AdapterError(path, "has no weight_map of tensor names to weight files")
    for name in set(weight_map.values()):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise AdapterError(path, f"names weight file {name!r}; expected a .safetensors file beside the index")
    return weight_map


def _check_index(path: Path, weight_map: dict[str, str], shards: dict[str, TensorFile]) -> None:
    for key, shard in weight_map.items():
        if key not in shards[shard].index:
            raise AdapterError(path, f"says {key} is in {shard}, but {shard} does not hold it")


def _read_config(folder: Path) -> dict:
    """config.json, for what fold needs to know (tied embeddings); {} if absent or unreadable."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}
