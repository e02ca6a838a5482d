"""The base of every configuration section, and the number types that refuse ``true``/``false``."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_a_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1.0: a typo'd `sustain_s: true` would silently become one second.
    if isinstance(value, bool):
        raise ValueError(f"a number is required, not {str(value).lower()}")
    return value


# Numbers that refuse booleans (from YAML, environment variables and config/set alike); numeric
# text such as "0.7" still reads as a number, as an environment variable's value must.
Number = Annotated[float, BeforeValidator(_not_a_bool)]
Integer = Annotated[int, BeforeValidator(_not_a_bool)]


def _inside_image(zone: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = zone
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError("zone must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return zone


# A part of the image: x0, y0, x1, y1 as fractions of its width and height.
ImageZone = Annotated[tuple[float, float, float, float], AfterValidator(_inside_image)]
