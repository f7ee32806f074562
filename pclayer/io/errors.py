"""Exceptions raised when reading or writing circuit files."""


class CircuitFileError(ValueError):
    """A circuit file is truncated, corrupted, of an unknown or newer format, or inconsistent."""


class UnsafePickleError(CircuitFileError):
    """A pickle-based file (PyJuice ``.jpc``) refers to a class or function outside the allow-list."""
