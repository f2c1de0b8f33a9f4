"""Errors a user can cause. Each carries one clear sentence for the UI and the command line."""


class FuseGPTError(Exception):
    """Base class: a problem with the user's input or environment, shown as one line, no traceback."""


class ModelLoadError(FuseGPTError):
    """The model could not be found, read or is not supported."""


class DataError(FuseGPTError):
    """The text for calibration or evaluation is missing, empty, too short or unreadable."""


class PlanError(FuseGPTError):
    """An impossible choice of blocks, groups or hyperparameters."""


class RecipeError(FuseGPTError):
    """A recipe file is malformed, has unknown keys or belongs to another model."""


class Cancelled(FuseGPTError):
    """The user stopped a run; nothing was changed on the original model."""


class TrainingDiverged(FuseGPTError):
    """A fusion round's loss became NaN or exploded; the round was rolled back."""


class OutOfMemory(FuseGPTError):
    """The device ran out of memory during a run; the input model is unchanged."""


class ResumeError(FuseGPTError):
    """A checkpoint that cannot be resumed: missing, corrupt, or made for another model or text."""
