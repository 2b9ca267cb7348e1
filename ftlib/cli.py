"""Shared entry-point plumbing: flag parsing and user errors as one line."""

import sys

from absl import app, flags, logging

from ftlib import distributed, malloc_env
from ftlib.errors import FtlibError


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags reports an unknown --config.a.b key as a bare AttributeError/KeyError.
        sys.exit(f"error: bad flag or config override: {type(e).__name__}: {e}")


def run(main):
    """app.run(main) where an FtlibError or a bad flag ends the program with one
    line on stderr, no traceback. First the process restarts itself with its malloc
    settings where they help (ftlib.malloc_env)."""
    malloc_env.restart()

    def guarded(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        try:
            distributed.initialize_from_flags()
            main()
        except FtlibError as e:
            sys.exit(f"error: {e}")

    app.run(guarded, flags_parser=_parse_flags)
