"""One exception type for problems a user can fix.

The CLI prints these as a single line (no traceback unless ``--debug``), so every message must name
the thing that is wrong (file, block, shape, class count) and what to change.
"""


class GraftkdError(Exception):
    """A user-fixable problem: bad input, bad config, incompatible models or files."""


class UnsupportedPairing(GraftkdError):
    """A method cannot work with this teacher/student pair (e.g. FSKD needs a channel-pruned teacher).

    The experiment grid records such cells as "unsupported" with the message instead of failing.
    """

    unsupported = True


class Interrupted(GraftkdError):
    """SIGINT/SIGTERM stopped a run after its state was saved: not a failure (the CLI exits 130)."""
