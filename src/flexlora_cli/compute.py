"""Where and how precisely a round computes, and the dtype it writes (the library's settings)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flexlora_cli.choices import OutputDtype, Precision, SvdMode, SvdPath, value
from flexlora_cli.errors import OptionError

_PRECISIONS = {Precision.fp32: torch.float32, Precision.fp64: torch.float64}
_DTYPES = {
    OutputDtype.float32: torch.float32,
    OutputDtype.bfloat16: torch.bfloat16,
    OutputDtype.float16: torch.float16,
    OutputDtype.float64: torch.float64,
}


@dataclass(frozen=True)
class Compute:
    """Compute settings of a verb. Accepts the enums of flexlora_cli.choices or their string values.

    precision: fp32 or fp64 arithmetic. device: auto, cpu, cuda or cuda:N. dtype: output dtype (None keeps
    each input's). balanced: sqrt(S) on both factors instead of S in B. svd: exact or randomized.
    path: the SVD path per module (auto: the cost model of svd_paths).
    """

    precision: Precision | str = Precision.fp32
    device: str = "auto"
    dtype: OutputDtype | str | None = None
    balanced: bool = False
    svd: SvdMode | str = SvdMode.exact
    path: SvdPath | str = SvdPath.auto

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("precision", _choice(Precision, self.precision, "precision"))
        set_("svd", _choice(SvdMode, self.svd, "svd"))
        set_("path", _choice(SvdPath, self.path, "svd_path"))
        if self.dtype is not None:
            set_("dtype", _choice(OutputDtype, self.dtype, "dtype"))
        if self.svd is SvdMode.randomized and self.path is SvdPath.incremental:
            raise OptionError.argument("svd_path", "the randomized SVD runs on the stacked or dense operator, not incremental")
        device = str(self.device)
        index = device.removeprefix("cuda:")
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
            raise OptionError.argument("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError.argument("device", f"{device} was asked for but no CUDA device is available")
        set_("device", device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The arithmetic dtype."""
        return _PRECISIONS[self.precision]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def output_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype an output is written in: --dtype, else the input's."""
        return _DTYPES[self.dtype] if self.dtype is not None else input_dtype


def widest_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype that holds every input exactly (bf16 + fp16 -> fp32): for outputs shared by all clients."""
    return functools.reduce(torch.promote_types, dtypes)


def _choice(kind, given, option: str):
    try:
        return kind(value(given))
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise OptionError.argument(option, f"must be one of {choices}, got {value(given)!r}") from None
