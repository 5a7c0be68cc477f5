"""``python -m traitloc.cli``: the ``traitloc`` command."""

from traitloc.cli.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
