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
    """An argument is invalid. `option` names the API parameter (e.g. "num_samples"); the CLI shows it as
    its flag (--num-samples). Without `option`, `source` names the input the problem is about."""

    def __init__(self, source: object, problem: str, hint: str | None = None, *, option: str | None = None):
        self.option = option
        super().__init__(option if option is not None else source, problem, hint)

    @classmethod
    def argument(cls, option: str, problem: str, hint: str | None = None) -> OptionError:
        """A bad value of the API parameter `option`."""
        return cls(None, problem, hint, option=option)

    def renamed(self, source: str) -> OptionError:
        """The same error, shown against `source` (the CLI's flag for the parameter)."""
        return OptionError(source, self.problem, self.hint)


class OutputError(FlexLoraError):
    """The output location cannot be written as asked."""
