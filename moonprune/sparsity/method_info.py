"""A pruning method's registry entry (:class:`MethodInfo`), apart from the registry so
each method's package can define its own entry without importing the registry."""

from __future__ import annotations

from dataclasses import dataclass

from moonprune.sparsity.config import options_of

#: When each kind of method steps.
MASKER_STEPS = "after every optimizer step"
STRUCTURED_STEPS = "between fine-tuning stages"


@dataclass(frozen=True)
class MethodInfo:
    """A method's registry entry: what it is, where it comes from, when it steps, and
    the sparsity options it takes (``SparsityConfig`` field names; any other
    method-specific field is refused for it)."""

    name: str
    description: str
    origin: str
    structured: bool
    options: tuple[str, ...]

    @property
    def steps(self) -> str:
        """When the training loop calls ``step``."""
        return STRUCTURED_STEPS if self.structured else MASKER_STEPS

    def flags(self) -> list[str]:
        """The options as a user gives them: CLI flags, or ``sparsity.<field>`` for a
        recipe-only field (``moonprune methods``)."""
        table = options_of(self.name)
        return ["--sparsity", *(table[n][1] or f"sparsity.{n}" for n in self.options)]
