"""The one exception type the export tools raise for a user-facing failure."""


class ExportError(Exception):
    """A backbone could not be exported; the message says why and what to do."""
