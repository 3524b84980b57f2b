"""The `--dense` file: the literal full-size update per module, in the base weight's layout.

Keys are the base model's parameter names ("<module>.weight"), so `W[key] += delta[key]`
applies the update. The metadata carries the merged adapter's config and each module's layout,
so that `flexlora split` can turn the file back into LoRA adapters on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flexlora_cli.adapters.write import config_json
from flexlora_cli.errors import AdapterError

DENSE_FILE_NAME = "flexlora_delta.safetensors"
_CONFIG_KEY = "flexlora.adapter_config"
_LAYOUT_KEY = "flexlora.layout"
_WEIGHT_SUFFIX = ".weight"


def is_transposed(kind: str, fan_in_fan_out: bool) -> bool:
    """PEFT stores B @ A transposed relative to the weight for embeddings and Conv1D layers."""
    return kind == "embedding" or fan_in_fan_out


def write_dense(path: Path, config: LoraConfig, deltas: dict[str, tuple[str, torch.Tensor]]) -> None:
    """deltas: module name -> (kind, B @ A as a d_out x d_in tensor)."""
    tensors, layout = {}, {}
    for name, (kind, delta) in deltas.items():
        transposed = is_transposed(kind, bool(config.fan_in_fan_out))
        tensors[name + _WEIGHT_SUFFIX] = (delta.mT if transposed else delta).contiguous().cpu()
        layout[name] = {"kind": kind, "transposed": transposed, "shape": list(delta.shape)}
    metadata = {"format": "pt", _CONFIG_KEY: config_json(config), _LAYOUT_KEY: json.dumps(layout, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def read_dense_layout(path: Path) -> tuple[LoraConfig, dict[str, dict]]:
    """The merged config and per-module layout stored in a dense file's header."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
    except (SafetensorError, OSError) as error:
        raise AdapterError(path, f"not a readable safetensors file: {error}") from None
    if _CONFIG_KEY not in metadata or _LAYOUT_KEY not in metadata:
        raise AdapterError(path, "not a flexlora --dense file (no flexlora metadata in its header)")
    layout = json.loads(metadata[_LAYOUT_KEY])
    missing = [name for name in layout if name + _WEIGHT_SUFFIX not in keys]
    if missing:
        raise AdapterError(path, f"missing the delta of module {missing[0]}")
    return LoraConfig.from_peft_type(**json.loads(metadata[_CONFIG_KEY])), layout


def read_dense_delta(path: Path, name: str, layout: dict) -> torch.Tensor:
    """One module's delta as d_out x d_in (the B @ A orientation), checked to be finite."""
    with safe_open(path, framework="pt") as handle:
        delta = handle.get_tensor(name + _WEIGHT_SUFFIX)
    if not bool(torch.isfinite(delta).all()):
        raise AdapterError(path, f"delta of module {name} contains NaN or Inf")
    return delta.mT if layout["transposed"] else delta
