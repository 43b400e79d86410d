"""The one error every model source raises."""


class ModelSourceError(RuntimeError):
    """The model could not be found or fetched; the message names the model, says why and what to do."""
