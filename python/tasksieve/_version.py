"""The package version, in the op layer so that every layer can report it without importing the facade."""

__version__ = "0.1.0"
