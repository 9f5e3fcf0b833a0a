"""Error types of the data package.

Bad input is an everyday event for a data pipeline (a renamed column, a truncated download), so it gets its
own exception type that callers and the CLI can catch and print as one readable line instead of a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent; the message names the file and the problem."""


class FetchError(DataError):
    """A dataset could not be downloaded, verified or unpacked."""
