"""The `misalign` command. Each command parses its options and calls one library function.

Imports of the library happen inside the commands so that `misalign --help` stays instant
(torch is only loaded by the commands that run a model).
"""

from __future__ import annotations

import logging
import sys

import click

from misalign import __version__
from misalign.errors import InputError


class _Group(click.Group):
    """A click group that turns `InputError` into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="misalign")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """misalign: why one-stage detectors keep the wrong boxes."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- data -------------------------------------------------------------------------------------


@main.group(cls=_Group)
def data() -> None:
    """Write the built-in shapes dataset, or check a COCO dataset."""


# --- train ------------------------------------------------------------------------------------

# --- dump / import ----------------------------------------------------------------------------

# --- report / demo ----------------------------------------------------------------------------


if __name__ == "__main__":
    main()
