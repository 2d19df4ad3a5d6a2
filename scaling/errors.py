"""The one family of exceptions that `scaling` raises for user mistakes.

Every error names what is at fault (a file, a field, a column, a value) and the rule it
broke or the valid choices, so that the CLI can print it as one line without a traceback.
"""

from __future__ import annotations


class ScalingError(Exception):
    """Base class: a user-facing error whose message is complete on its own."""


class SpecError(ScalingError):
    """A sweep spec (YAML) is invalid: unknown key, wrong type, impossible value."""


class DataError(ScalingError):
    """A corpus or a token file is missing, unreadable or unusable."""


class ResultsError(ScalingError):
    """A results folder or a table cannot be read or does not have what is needed."""


class FitError(ScalingError):
    """A fit cannot be done at all (as opposed to a fit with warnings)."""


class LaunchError(ScalingError):
    """Runs cannot be launched: bad executor settings, cluster refusing the job."""
