"""Errors a user can act on: each names the file, line or field that is wrong."""

from __future__ import annotations


class DataError(ValueError):
    """Input data is malformed. The message names the file and the line or field."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None,
                 field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class ConfigMismatchError(ValueError):
    """A saved artifact does not fit the configuration or data it is loaded with."""


class LeakageError(ValueError):
    """Train and test share interactions; evaluating would report inflated numbers."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range; the message names
    the file (or the command-line option) and the key path."""


class ImageError(ValueError):
    """Image bytes that cannot be used: empty, not a decodable image, or too large to decode
    safely (`too_large`: above the pixel limit, or a decompression bomb). The message says
    which."""

    def __init__(self, message: str, *, too_large: bool = False):
        self.too_large = too_large
        super().__init__(message)
