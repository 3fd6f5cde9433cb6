"""Every error kcs-lens expects: one base class, one subclass per kind of bad input.

The CLI catches :class:`KcsLensError` only and prints its message as one ``error:`` line with exit
code 2. Anything else is a bug in kcs-lens and keeps its traceback (in the log file the CLI
names). Messages name what is wrong (the file and line, the option, the run directory) and, where
there is one, what to do.
"""

from __future__ import annotations


class KcsLensError(ValueError):
    """Expected bad input or state; the message says what is wrong and what to do."""


class ConfigError(KcsLensError):
    """A configuration value, option or file that cannot be used."""


class KGError(KcsLensError):
    """Bad knowledge-graph or text input; the message names the source (file, line, field)."""


class WordNetError(KGError):
    """WordNet data is missing or a synset/neighbourhood cannot be built."""


class ModelLoadError(KcsLensError):
    """A model spec that cannot be loaded; the message names the spec and what to do."""


class MaskError(KcsLensError):
    """A mask configuration that does not fit the model."""


class SubnetworkError(KcsLensError):
    """A subnetwork file that is missing, malformed, or does not fit the model given."""


class RunError(KcsLensError):
    """A run directory that cannot be read, started or continued."""


class NonFiniteLoss(RunError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class ExportError(KcsLensError):
    """An export that cannot be written; nothing is left behind."""


class OutputError(KcsLensError):
    """An output path that cannot be created or written, or that the tool must not replace."""


class KcsLensWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one
    ``note:`` line."""


class TaskError(KcsLensError):
    """Bad downstream-task input (questions, links, groups); the message names the file and line."""
