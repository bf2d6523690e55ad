"""The one exception the labs raise for problems a learner can fix; its message says how."""


class LabsError(RuntimeError):
    """A short, actionable error (bad model id, no network, not enough memory, missing library)."""
