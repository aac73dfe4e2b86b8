"""Exception types that mnistbench raises for bad input.

Every user-facing error derives from :class:`MnistbenchError`; the CLI prints its
message and exits with status 2. Messages name the file or key, the value found
and what was expected.
"""


class MnistbenchError(Exception):
    """Base class of every error caused by input the user can fix."""


class DataError(MnistbenchError):
    """A dataset file is malformed, fails its checksum, or cannot be obtained."""


class MatrixError(MnistbenchError):
    """A matrix file is invalid."""


class StoreError(MnistbenchError):
    """A store is missing, unreadable, or contains data that contradicts itself."""


class CheckInputError(MnistbenchError):
    """A thresholds file or baseline given to ``mnistbench check`` is invalid."""
