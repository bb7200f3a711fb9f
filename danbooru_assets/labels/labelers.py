"""Who is labeling: the labeling page names each labeler from the server's side.

Without a labelers file the page has one labeler, ``--labeler`` or the OS user, and serves
only loopback. With ``--labelers FILE`` every request must carry one of the file's tokens
(a cookie the page sets when opened with ``?token=…``, or ``Authorization: Bearer …``) and
its labels carry that token's name; a request can never choose a name itself.

The file, one labeler per line (``#`` starts a comment)::

    alice   4Q0Hqj0m0cS1b9w0x6mN3w
    bob     k3J1PZ2m7ZcVq8e2rXyq0A

the token is the line's last field, the name everything before it. Make a token with
``python -c "import secrets; print(secrets.token_urlsafe(16))"``.
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_LENGTH = 16  # ~96 bits from token_urlsafe(12); shorter ones are guessable


class LabelersFileError(ValueError):
    """The labelers file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Labelers:
    """Token → name of every labeler of a shared page."""

    names: dict[str, str]
    source: str = ""

    def name_for(self, token: str | None) -> str | None:
        """The labeler holding ``token``, else ``None`` (compared in constant time)."""
        if not token:
            return None
        found = None
        for known, name in self.names.items():
            if hmac.compare_digest(known.encode("utf-8"), token.encode("utf-8", "surrogateescape")):
                found = name
        return found

    def __len__(self) -> int:
        return len(self.names)


def parse_labelers(text: str, source: str = "<labelers>") -> Labelers:
    """Parse a labelers file's text (see the module docstring)."""
    names: dict[str, str] = {}
    seen_names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise LabelersFileError(f"{source}:{number}: expected 'NAME TOKEN', got {line!r}")
        token, name = parts[-1], " ".join(parts[:-1])
        if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            raise LabelersFileError(f"{source}:{number}: the token of {name!r} must be at least {MIN_TOKEN_LENGTH} "
                                    "printable ASCII characters (python -c \"import secrets; "
                                    "print(secrets.token_urlsafe(16))\")")
        if token in names:
            raise LabelersFileError(f"{source}:{number}: {name!r} has the same token as {names[token]!r}")
        if name in seen_names:
            raise LabelersFileError(f"{source}:{number}: labeler {name!r} is already on line {seen_names[name]}")
        names[token] = name
        seen_names[name] = number
    if not names:
        raise LabelersFileError(f"{source}: no labelers (one 'NAME TOKEN' per line)")
    return Labelers(names, source)


def load_labelers(path: Path | str) -> tuple[Labelers, str | None]:
    """Read a labelers file; returns the labelers and a warning when others may read it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelersFileError(f"labelers file {path}: cannot be read ({exc})") from None
    warning = None
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warning = (f"WARNING: labelers file {path} is readable by other users of this machine, who could "
                   f"label under anyone's name: chmod 600 {path}")
    return parse_labelers(text, str(path)), warning
