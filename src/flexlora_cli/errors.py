"""One error family: the CLI prints these as one line and exits 2; anything else is a bug."""

from __future__ import annotations


class FlexLoraError(Exception):
    """A problem with the user's input or environment, reported as `<source>: <problem>`."""

    def __init__(self, source: object, problem: str, hint: str | None = None):
        self.source = str(source) if source is not None else None
        self.problem = " ".join(problem.split())  # one line, even when a library's reason has several
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.source}: {self.problem}" if self.source else self.problem
        return f"{text} (hint: {self.hint})" if self.hint else text


class AdapterError(FlexLoraError):
    """An input adapter is missing, malformed, or cannot be merged faithfully."""


class IncompatibleAdaptersError(FlexLoraError):
    """Adapters that are each valid but cannot be combined (shapes, base models, layouts)."""


class OptionError(FlexLoraError):
    """A command-line option or API argument is invalid."""


class OutputError(FlexLoraError):
    """The output location cannot be written as asked."""
