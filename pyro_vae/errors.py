"""The exceptions a user of pyro_vae can meet, each naming one kind of mistake.

They subclass the built-in exception a caller would otherwise expect, so code that
catches ``ValueError`` keeps working; the command-line scripts print their message
as one line instead of a traceback.
"""


class DataError(ValueError):
    """The data is missing, malformed, or does not suit the chosen likelihood."""


class CheckpointError(ValueError):
    """A file is not a pyro_vae checkpoint, is damaged, or does not match the model."""


class TrainingDivergedError(RuntimeError):
    """The training loss stopped being finite; ``step`` is the first bad optimizer step."""

    def __init__(self, step: int, loss: float, gradient: bool = False):
        what = (
            f"the gradient became non-finite (loss {loss:.6g})"
            if gradient
            else f"training loss became {loss}"
        )
        super().__init__(
            f"{what} at step {step}; stopped before applying that step (try a lower learning rate)"
        )
        self.step = step
        self.loss = loss


class UsageError(ValueError):
    """An option, argument or combination of them that cannot work, e.g. an unknown
    likelihood, a negative batch size, or a mode the model is not in."""


class ProcessLostError(RuntimeError):
    """Another process of a multi-process run stopped (killed, out of memory, its machine
    gone), so this one cannot go on; the run resumes from its last checkpoint."""
