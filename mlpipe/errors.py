"""The one exception type users see: a one-line reason, no traceback."""


class MlpipeError(Exception):
    """Bad input or a failed check. `str(err)` is a single line fit for a terminal."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
