"""The ``cahfp`` command: a small dispatcher. Each command is one module owned by its layer
(core commands here; ``coordinator``, ``simulate``, ``compare`` and ``export`` in
``coordinator.commands``; ``client`` in ``edge_client.commands``; ``deploy``, ``testbed`` and
``demo`` in ``deploy.commands``), found through the entry-point group ``cahfp.commands`` (see
pyproject.toml): each entry names a ``register(subparsers)`` that adds its parser and sets its
``handler``. Registering uses argparse only and handlers import their implementation lazily, so
that ``cahfp infer`` on an inference-only board never imports torch or pydantic."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points

from cahfp.errors import CAHFPError

GROUP = "cahfp.commands"


class CommandsUnavailable(CAHFPError):
    """The commands cannot be found or loaded (the package is not installed, or is broken)."""


def command_entry_points() -> list[EntryPoint]:
    """The registered commands, one per name (the first installed copy wins), in declared
    order."""
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        seen.setdefault(ep.name, ep)
    if not seen:
        raise CommandsUnavailable(
            f"no cahfp commands are registered (entry-point group {GROUP!r}): install the "
            "package (pip install -e . or pip install .)"
        )
    return list(seen.values())


def build_parser(commands: list[EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="cahfp",
        description="CA-HFP Edge: curvature-aware heterogeneous federated pruning on edge boards",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in commands if commands is not None else command_entry_points():
        try:
            register = ep.load()
        except (ImportError, AttributeError) as exc:
            raise CommandsUnavailable(
                f"command {ep.name!r} cannot be loaded from {ep.value}: {exc}"
            ) from None
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        commands = command_entry_points()
        names = [ep.name for ep in commands]
        if argv and not argv[0].startswith("-") and argv[0] not in names:
            raise CAHFPError(f"unknown command {argv[0]!r}; commands: {', '.join(names)}")
        # load only what runs (and the whole set for help): a broken command stops only itself
        wanted = [ep for ep in commands if ep.name == argv[0]] if argv and argv[0] in names else []
        parser = build_parser(wanted or commands)
    except CAHFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except CAHFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 77: refused for good, systemd does not restart
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
