"""A string model: one text in, its word and character counts and its reverse out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gpufleet import Model


class TextInput(BaseModel):
    """One input. Published as JSON Schema by GET /v1/models and checked at submit."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=100_000, description="Any text.")


class TextStats(Model):
    input_model = TextInput

    def predict(self, inputs: list[Any]) -> list[Any]:
        # A batch in, one output per input out, in order.
        outputs = []
        for item in inputs:
            text = self.parse(item).text
            outputs.append({"words": len(text.split()), "chars": len(text), "reversed": text[::-1]})
        return outputs
