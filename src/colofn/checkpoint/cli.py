"""``colofn checkpoint convert --trust PATH``: rewrite a checkpoint of the pickled format as data."""

from __future__ import annotations

import argparse
import sys


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("checkpoint", help="checkpoint tools (convert an older, pickled checkpoint)")
    tools = p.add_subparsers(dest="tool", required=True)
    c = tools.add_parser(
        "convert",
        help="rewrite checkpoints written by colofn before safe loading (pickled manifests) as data",
        description="Older colofn checkpoints stored their tree structure and some values as pickles, which run "
        "code when read. This unpickles them once and rewrites the manifest as data; run it only on "
        "checkpoints you trust.",
    )
    c.add_argument("--trust", action="store_true", help="required: confirm that you trust these files")
    c.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from colofn.checkpoint import convert
    from colofn.errors import CheckpointError

    status = 0
    for path in args.paths:
        try:
            convert(path, trust=args.trust)
            print(f"{path}: converted (or already current)")
        except CheckpointError as e:
            print(f"colofn checkpoint convert: {e}", file=sys.stderr)
            status = 1
    return status
