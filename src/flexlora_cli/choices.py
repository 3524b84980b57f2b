"""The typed choices of the library and the CLI (no torch here: `--help` lists them instantly).

The library accepts these enums or their string values; the CLI's options are typed with them, so
`--help` shows every choice and typer refuses anything else before any work.
"""

from __future__ import annotations

from enum import Enum

from flexlora_cli.methods.registry import METHODS


class Precision(str, Enum):
    """Compute precision."""

    fp32 = "fp32"
    fp64 = "fp64"


class SvdMode(str, Enum):
    """exact, or randomized: only the top components an output needs."""

    exact = "exact"
    randomized = "randomized"


class SvdPath(str, Enum):
    """How each module's SVD is computed (svd_paths): auto picks by a cost model."""

    auto = "auto"
    stacked = "stacked"
    dense = "dense"
    incremental = "incremental"


class OutputDtype(str, Enum):
    """Output dtype of written adapters."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


# --method: one member per registered method (flexlora_cli.methods.registry), in registry order.
MethodName = Enum("MethodName", {name.replace("-", "_"): name for name in METHODS}, type=str)
MethodName.__doc__ = "An aggregation method of flexlora_cli.methods.registry."


def value(choice) -> str:
    """The plain string of an enum member or a string (library arguments accept either)."""
    return choice.value if isinstance(choice, Enum) else str(choice)
