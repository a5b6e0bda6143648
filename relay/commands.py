"""The ``chert-relay`` commands: each also takes ``-c/--config`` after its name.

``chert-relay -c FILE check-config`` and ``chert-relay check-config -c FILE`` are the
same; given in both places, the later one wins. Built on public argparse only: every
command gets the option from a parent parser (``parents=[…]``), and every command —
nested ones too (``dlq list``) — is made through :class:`Commands`, so none can be
left without it.
"""

from __future__ import annotations

import argparse
from typing import Any

CONFIG_HELP = "configuration file (also accepted before the command)"


def config_option(help: str = CONFIG_HELP) -> argparse.ArgumentParser:
    """A parent parser with ``-c/--config``. Its default is ``SUPPRESS``: a command
    without it leaves the value given before the command (or its default) alone."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-c", "--config", default=argparse.SUPPRESS, help=help)
    return parent


class Commands:
    """The commands of ``parser`` (one of them is required, named in ``dest``)."""

    def __init__(self, parser: argparse.ArgumentParser, *, dest: str, metavar: str) -> None:
        self._sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)

    def add(
        self, name: str, *, config_help: str = CONFIG_HELP, **kwargs: Any
    ) -> argparse.ArgumentParser:
        """A new command ``name`` taking ``-c/--config`` (described by ``config_help``);
        ``kwargs`` as for argparse's ``add_parser`` (``help``, ``description``, …)."""
        return self._sub.add_parser(name, parents=[config_option(config_help)], **kwargs)
