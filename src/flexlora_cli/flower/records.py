"""Tensors in and out of Flower's ArrayRecord, bfloat16 included.

Flower serializes every Array through numpy (`np.save`), and numpy has no bfloat16: a bf16
tensor cannot be turned into an Array at all. bf16 tensors therefore travel as their raw
little-endian 16-bit patterns, under a stype of their own so that no Flower tool mistakes
them for numpy data. Every other dtype uses Flower's standard numpy encoding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

BFLOAT16_STYPE = "flexlora.bfloat16-le"
_BFLOAT16 = "bfloat16"
_LITTLE_ENDIAN_16 = np.dtype("<u2")


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding each tensor under its own key, bit for bit."""
    return ArrayRecord({key: _to_array(tensor) for key, tensor in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, in their original dtypes."""
    return {key: _to_tensor(array) for key, array in record.items()}


def _to_array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.uint16).numpy().astype(_LITTLE_ENDIAN_16, copy=False)
        return Array(dtype=_BFLOAT16, shape=tuple(tensor.shape), stype=BFLOAT16_STYPE, data=bits.tobytes())
    return Array(tensor)


def _to_tensor(array: Array) -> torch.Tensor:
    if array.stype == BFLOAT16_STYPE:
        bits = np.frombuffer(array.data, dtype=_LITTLE_ENDIAN_16).astype(np.uint16)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(array.shape)
    return torch.from_numpy(np.ascontiguousarray(array.numpy()))
