"""Errors a user can fix. Every script's entry point (`utils.run.exit_on_user_error`) turns a `UserError` into its
message and exit code 1; anything else is a bug and keeps its stack trace."""
from __future__ import annotations


class UserError(Exception):
    """A bad input (missing file, clashing config, unusable run dir); the message names the problem and the fix."""


class UserConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the value and the fix."""


class DatasetError(UserError, RuntimeError):
    """A dataset that is missing or does not match its config; the message names the command that makes it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, foreign or does not fit; the message names the file and keys."""


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked; the message offers the ways out."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says at which step and what is kept."""
