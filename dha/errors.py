"""Errors that mean "the user's input is wrong": the CLI prints them in one line and exits 2."""


class UserError(Exception):
    """Bad input (path, architecture, plan, data, option). The message names the problem."""
