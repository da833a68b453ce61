"""The one exception type that reaches the user as a single line on stderr."""


class PipelineError(Exception):
    """Bad input or an unmet precondition; the message is shown as one line, exit code 2."""
