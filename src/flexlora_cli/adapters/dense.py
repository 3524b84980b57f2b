"""The `--dense` file: the literal full-size update per module, in the base weight's layout.

Keys are the base model's parameter names ("<module>.weight"), so `W[key] += delta[key]`
applies the update. The metadata carries the merged adapter's config and each module's layout,
so that `flexlora split` can turn the file back into LoRA adapters on its own.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flexlora_cli.adapters.config import AdapterConfig
from flexlora_cli.adapters.files import parse_json
from flexlora_cli.adapters.tensors import TensorFile, all_finite
from flexlora_cli.errors import AdapterError

DENSE_FILE_NAME = "flexlora_delta.safetensors"
_CONFIG_KEY = "flexlora.adapter_config"
_LAYOUT_KEY = "flexlora.layout"
_WEIGHT_SUFFIX = ".weight"


def is_transposed(kind: str, fan_in_fan_out: bool) -> bool:
    """PEFT stores B @ A transposed relative to the weight for embeddings and Conv1D layers."""
    return kind == "embedding" or fan_in_fan_out


def write_dense(path: Path, config: AdapterConfig, deltas: dict[str, tuple[str, torch.Tensor]]) -> None:
    """deltas: module name -> (kind, B @ A as a d_out x d_in tensor)."""
    tensors, layout = {}, {}
    for name, (kind, delta) in deltas.items():
        transposed = is_transposed(kind, bool(config.fan_in_fan_out))
        tensors[name + _WEIGHT_SUFFIX] = (delta.mT if transposed else delta).contiguous().cpu()
        layout[name] = {"kind": kind, "transposed": transposed, "shape": list(delta.shape)}
    metadata = {"format": "pt", _CONFIG_KEY: config.to_json(), _LAYOUT_KEY: json.dumps(layout, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def read_dense_layout(path: Path) -> tuple[AdapterConfig, dict[str, dict]]:
    """The merged config and per-module layout stored in a dense file's header."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(path, f"not a readable safetensors file (truncated or damaged): {error}") from None
    if _CONFIG_KEY not in metadata or _LAYOUT_KEY not in metadata:
        raise AdapterError(path, "not a flexlora --dense file (no flexlora metadata in its header)")
    layout, raw_config = parse_json(metadata[_LAYOUT_KEY], path), parse_json(metadata[_CONFIG_KEY], path)
    if not isinstance(layout, dict) or not layout:
        raise AdapterError(path, "damaged flexlora metadata: no module layout")
    for name, info in layout.items():
        _check_layout(path, name, info, shapes.get(name + _WEIGHT_SUFFIX))
    return AdapterConfig.from_dict(raw_config, path), layout


def dense_dtype(path: Path) -> torch.dtype:
    """The dtype the dense file's deltas are stored in (from the header: nothing is read)."""
    return functools.reduce(torch.promote_types, (info.torch_dtype for info in TensorFile(path).index.values()))


def _check_layout(path: Path, name: str, info: object, stored: list[int] | None) -> None:
    """A module's recorded layout must be well-formed and match the tensor actually stored."""
    if stored is None:
        raise AdapterError(path, f"missing the delta of module {name}")
    shape = info.get("shape") if isinstance(info, dict) else None
    valid = (
        isinstance(info, dict) and info.get("kind") in ("linear", "embedding") and isinstance(info.get("transposed"), bool)
        and isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)
    )
    if not valid:
        raise AdapterError(path, f"damaged flexlora metadata for module {name}")
    expected = shape[::-1] if info["transposed"] else shape
    if stored != expected:
        raise AdapterError(path, f"delta of module {name} is {stored} but its layout says {expected}")


def read_dense_delta(path: Path, name: str, layout: dict) -> torch.Tensor:
    """One module's delta as d_out x d_in (the B @ A orientation), checked to be finite."""
    with safe_open(path, framework="pt") as handle:
        delta = handle.get_tensor(name + _WEIGHT_SUFFIX)
    if not all_finite(delta):
        raise AdapterError(path, f"delta of module {name} contains NaN or Inf")
    return delta.mT if layout["transposed"] else delta
