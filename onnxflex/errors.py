"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class OnnxflexError(Exception):
    """A problem with the user's input (model, calibration data, flags, paths).

    The message must name the problem and the fix, in one line.
    """


class InternalError(RuntimeError):
    """A bug in onnxflex, not in the user's model or data: the message names the pass that failed
    and where to report it (the CLI prints it as one line and exits 1)."""
