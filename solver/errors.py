"""The one base class of errors a user can fix, and the solver's own error kinds.

Every error whose cause is in the user's hands (a config value, a path, a checkpoint that does
not fit, a busy experiment) derives from `UserError`: the entry point catches that class alone,
prints its message (which names the key, file or value and what to do) and exits with 1.
Anything else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class SolverError(UserError, RuntimeError):
    """A user-fixable problem with a run (continue_from, state that does not fit, divergence)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


class DivergenceError(ArithmeticError):
    """The training loss went non-finite (or spiked): the trigger of a rollback, not a user error."""
