"""One exception family: anything the user can fix is a CbirError whose message says how."""


class CbirError(Exception):
    """A problem with the user's input or environment, reported as a plain message (no traceback)."""


class WeightsUnavailable(CbirError):
    """Weights that the encoder needs are not on this machine."""


class ImageError(CbirError):
    """An input that is not a usable image; the message is the reason shown to the user (an indexed file's skip
    reason, or the end of a query's message)."""


class BoxError(CbirError):
    """A region of a query image that cannot be used (no area, or outside the picture)."""


class QueryImageError(ImageError):
    """A query image that cannot be used; `reason` says why in words a page can show as they are."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot use the query image: {reason}")
        self.reason = reason
