"""The records pvfast works on: annotations, SFT examples and preference records.

An *annotation* is one (Code, Sub-code, Span) triple with canonical label strings. An *example* is one
message with its direction and gold annotations. A *preference record* is one prompt with its chosen
completion and one or more rejected completions (k pairs sharing one prompt); completions are stored as
the exact text the model is trained on (canonical JSON, see :mod:`pvfast.data.jsonfmt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pvfast.data.codebook import DIRECTIONS


@dataclass(frozen=True)
class Annotation:
    code: str
    subcode: str
    span: str

    def to_dict(self) -> dict[str, str]:
        """The published field names, in the published order."""
        return {"Code": self.code, "Sub-code": self.subcode, "Span": self.span}

    @property
    def label(self) -> tuple[str, str]:
        return (self.code, self.subcode)


@dataclass(frozen=True)
class Example:
    """One message with its gold annotations (the SFT record)."""

    id: str
    direction: str  # "Y": provider writes to patient; "N": patient writes to provider
    message: str
    annotations: tuple[Annotation, ...] = ()

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        object.__setattr__(self, "annotations", tuple(self.annotations))

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "direction": self.direction,
            "message": self.message,
            "annotations": [a.to_dict() for a in self.annotations],
        }


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt, its chosen completion and k >= 1 rejected completions (k pairs, one shared prompt).

    Either ``direction`` and ``message`` are set (pvfast builds the prompt with its prompt builder) or
    ``prompt`` holds a ready prompt text (the TRL ``prompt``/``chosen``/``rejected`` layout).
    ``strategies`` names how each rejected completion was made (e.g. "label", "missing", "extra").
    """

    id: str
    chosen: str
    rejected: tuple[str, ...]
    direction: str | None = None
    message: str | None = None
    prompt: str | None = None
    strategies: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rejected", tuple(self.rejected))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        if not self.rejected:
            raise ValueError(f"preference record {self.id!r} has no rejected completion")
        if self.prompt is None and (self.direction is None or self.message is None):
            raise ValueError(f"preference record {self.id!r} needs either prompt or direction+message")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.strategies and len(self.strategies) != len(self.rejected):
            raise ValueError(f"preference record {self.id!r}: {len(self.strategies)} strategies for "
                             f"{len(self.rejected)} rejected completions")

    def to_dict(self) -> dict:
        out: dict = {"id": self.id}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.direction is not None:
            out["direction"] = self.direction
            out["message"] = self.message
        out["chosen"] = self.chosen
        out["rejected"] = list(self.rejected)
        if self.strategies:
            out["strategies"] = list(self.strategies)
        return out
