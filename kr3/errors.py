class UserError(Exception):
    """A mistake the user can fix: shown as one line ("what is wrong — what to do"), no traceback."""
