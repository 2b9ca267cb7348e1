class FtlibError(Exception):
    """An error the user can act on; printed as one line, no traceback."""
