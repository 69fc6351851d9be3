"""Exceptions.  Every error a user can cause is a ``LoraBudgetError``: the CLI prints its message on one line of
stderr and exits with status 1 (never a traceback)."""

from __future__ import annotations


class LoraBudgetError(Exception):
    """Base class for errors caused by user input or environment; the message is one complete sentence."""


class UnknownModelError(LoraBudgetError):
    """A model name that is neither in the catalog nor a readable config.json path."""


class UnknownGPUError(LoraBudgetError):
    """A GPU name that is not in the catalog and not a bare size such as 48GB."""


class ConfigError(LoraBudgetError):
    """An invalid option, option combination, or a malformed / unsupported config file."""


class MissingDependencyError(LoraBudgetError):
    """An optional feature whose extra (torch, pandas, ...) is not installed."""


class InfeasibleError(LoraBudgetError):
    """No setup satisfies the request (planner / fit solver)."""
