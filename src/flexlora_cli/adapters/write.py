"""Writing PEFT adapter folders, all-or-nothing.

Every output is built in a temporary sibling folder and renamed into place only when complete,
so an interrupted run leaves either the old state or the whole new output, never a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from flexlora_cli.errors import OutputError

MODEL_CARD_NAME = "README.md"


def check_output(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any work, an output that would clobber data or cannot be written."""
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(target, f"is inside the input {source}; inputs are never modified")
        if resolved in source.parents:
            raise OutputError(target, f"contains the input {source}; choose another output folder")
    if target.exists():
        if not target.is_dir():
            raise OutputError(target, "exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise OutputError(target, "exists and is not empty", hint="pass --overwrite to replace it")
    parent = _existing_parent(resolved)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(target, f"cannot write in {parent} (permission denied)")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_adapter(
    folder: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], card: str | None = None
) -> None:
    """A standard PEFT adapter folder: adapter_config.json + adapter_model.safetensors (+ card)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(config_json(config), encoding="utf-8")
    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    save_file(contiguous, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    if card is not None:
        (folder / MODEL_CARD_NAME).write_text(card, encoding="utf-8")


def config_json(config: LoraConfig) -> str:
    """PEFT's adapter_config.json text, with sets sorted so that reruns write identical bytes.

    (PEFT's own save_pretrained writes sets in hash order, which changes from run to run.)
    """
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return json.dumps(fields, indent=2, sort_keys=True)


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent
