"""The error type for bad user input; the command line turns it into exit code 2."""


class InputError(Exception):
    """Invalid input (recipe, path, model spec): reported as one clear message, exit code 2."""


class StageFailed(Exception):
    """A stage ran but its result fails a check (e.g. ONNX parity): exit code 1, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send): handled as Ctrl-C is, with exit code 143."""
