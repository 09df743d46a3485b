"""`sugard init`'s flags and their help, apart from what they do (`init`)."""

from __future__ import annotations

import argparse

__all__ = ["add_init_arguments"]


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--instance", metavar="NAME", help="instance name for a new config, like prod"
    )
    which.add_argument(
        "--add",
        metavar="NAME",
        help="add instance NAME to an existing config, keeping the others "
        "(the old file is kept as a .bak copy, since its comments are not carried over)",
    )
    p.add_argument("--url", help="site root, like https://crm.example.com")
    p.add_argument("--username", help="the Sugar user sugard logs in as")
    password = p.add_mutually_exclusive_group()
    password.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin and store it in NAME.password "
        "(mode 0600) next to the config",
    )
    password.add_argument(
        "--password-file",
        metavar="F",
        help="use the password in file F as is (written as given; a relative F is relative "
        "to the config's directory, as sugard reads it)",
    )
    password.add_argument("--password-env", metavar="VAR", help="take the password from $VAR")
    password.add_argument(
        "--password-command", metavar="CMD", help="run CMD (with sh -c) to get the password"
    )
    p.add_argument(
        "--platform",
        help="API platform (default: sugard); register it in Sugar first: Admin > Configure "
        "API Platforms (Sugar keeps one session per user and platform)",
    )
    p.add_argument("--client-id", help="OAuth2 client id (default: sugar, the built-in one)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--client-secret-file", metavar="F", help="file holding the client secret (as F above)"
    )
    secret.add_argument("--client-secret-env", metavar="VAR", help="variable holding it")
    secret.add_argument("--client-secret-command", metavar="CMD", help="command printing it")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing config or password file, or replace an instance with --add "
        "(the old config is kept as a .bak copy)",
    )
    p.add_argument(
        "--fleet-key",
        metavar="FILE",
        help="only write a new random fleet key to FILE (mode 0600) and exit; copy it to every "
        "host of the fleet and name it in [fleet] key_file",
    )
