"""Common pydantic base for every scenario model: unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every config model: ``extra="forbid"`` so that a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)
