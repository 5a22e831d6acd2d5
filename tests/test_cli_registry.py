"""The CLI registry: every subcommand listed once with its help line, each
listing resolving to its module's table row, and only the chosen command
given its arguments (tests/test_import_footprint.py: and its module)."""

from __future__ import annotations

import importlib

import pytest

from agent.face.cli import REGISTRY, build_parser, chosen, command


def test_every_listing_resolves_and_every_command_is_listed() -> None:
    names = [listing.name for listing in REGISTRY]
    assert len(names) == len(set(names))
    for listing in REGISTRY:
        assert command(listing).name == listing.name
    for module in {listing.module for listing in REGISTRY}:
        table = importlib.import_module(module).COMMANDS
        listed = {listing.name for listing in REGISTRY if listing.module == module}
        assert {c.name for c in table} == listed, module


@pytest.mark.parametrize(("argv", "name"), [
    (["run", "--name", "put"], "run"), (["--", "put", "c"], "put"),
    (["-h"], None), (["--version"], None), ([], None), (["keys", "--json"], "keys"),
])
def test_the_chosen_command_is_the_first_non_option(argv: list[str], name: str | None) -> None:
    assert chosen(argv) == name


def test_only_the_chosen_command_gets_its_arguments() -> None:
    args = build_parser(["put", "c", "k", "1"]).parse_args(["put", "c", "k", "1"])
    assert (args.collection, args.key, args.value) == ("c", "k", "1")
    assert callable(args.handler)
