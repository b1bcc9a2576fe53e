"""The one exception type the export tools raise for a user-facing failure."""

from schemas.errors import UsageError


class ExportError(UsageError):
    """A backbone could not be exported; the message says why and what to do."""
