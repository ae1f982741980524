"""One exception family: anything the user can fix is a CbirError whose message says how."""


class CbirError(Exception):
    """A problem with the user's input or environment, reported as a plain message (no traceback)."""


class WeightsUnavailable(CbirError):
    """Weights that the encoder needs are not on this machine."""


class BoxError(CbirError):
    """A region of a query image that cannot be used (no area, or outside the picture)."""


class QueryImageError(CbirError):
    """A query image that cannot be used; `reason` says why in words a page can show as they are."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot use the query image: {reason}")
        self.reason = reason
