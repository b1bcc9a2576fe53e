"""One exception family for the whole product.

Everything sidetune raises on purpose derives from :class:`SidetuneError`;
bad bytes from the wire are always a :class:`WireError` (a ``ValueError``), so a
transport loop needs exactly one ``except`` to stay alive.
"""

from __future__ import annotations


class SidetuneError(Exception):
    """Root of every error sidetune raises on purpose."""


class WireError(SidetuneError, ValueError):
    """A payload or topic that does not satisfy the wire contract.

    ``code`` is a short machine-readable reason (it travels in rejections);
    the message says, for a person, what is wrong.
    """

    def __init__(self, message: str, code: str = "invalid", msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: The rejected message's id, when it could be read (rejections name it).
        self.msg_id = msg_id


class SpecMismatch(SidetuneError):
    """Weights or activations built for another spec or backbone."""
