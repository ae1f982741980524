"""One exception family: anything the user can fix is a CbirError whose message says how."""


class CbirError(Exception):
    """A problem with the user's input or environment, reported as a plain message (no traceback)."""
