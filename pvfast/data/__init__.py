"""The PV-Miner data layer: records, canonical JSON, readers with validation, the synthetic corpus."""

from pvfast.data.jsonfmt import ParseResult, parse_output, serialize, value_spans
from pvfast.data.records import Annotation, Example, PreferenceRecord

__all__ = ["Annotation", "Example", "PreferenceRecord", "ParseResult", "parse_output", "serialize",
           "value_spans"]
