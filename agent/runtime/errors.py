"""Errors the agent process reports to its caller."""


class StartupError(Exception):
    """The agent cannot start (port taken, unresolvable address). One line."""
