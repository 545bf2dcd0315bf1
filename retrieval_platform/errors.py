"""Errors that mean "the user must fix an input", reported by jobs as one clear line."""


class PlatformError(Exception):
    """Base of every error caused by an input (config, data file, model or index folder)."""
