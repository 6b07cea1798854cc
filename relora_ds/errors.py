"""The errors a run stops with: one line each, naming the setting or file and what is allowed."""


class RunError(ValueError):
    """A run that cannot start (output dir, checkpoint, data/model mismatch); one line."""


class NonFiniteError(RunError):
    """A non-finite loss or gradient norm: every rank stops at the same step with the same message."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step  # the optimizer step that was not taken (loss) or whose update is kept (gradient norm)
