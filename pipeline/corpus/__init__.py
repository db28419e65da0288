"""Corpus ingestion: input specs -> files -> records -> adapters -> validated units in shards.

Pure layer (no Ray): spec.py (InputSpec, expand_files), formats.py (streaming file readers),
adapters.py (published formats -> normalised rows), reader.py (validation, quarantine, shards,
read_units). Ray layer: ray_read.py (read_corpus: one streamed read task per input file).
"""

from pipeline.corpus.adapters import ADAPTERS, QuarantineError, Row, detect
from pipeline.corpus.reader import iter_shards, read_units, summarize, units_table, validate_row
from pipeline.corpus.spec import InputSpec, InputSpecError, expand_files


def read_corpus(*args, **kwargs):
    """See pipeline.corpus.ray_read.read_corpus (imported lazily: the pure layer needs no Ray)."""
    from pipeline.corpus.ray_read import read_corpus as _read_corpus

    return _read_corpus(*args, **kwargs)


__all__ = [
    "ADAPTERS",
    "InputSpec",
    "InputSpecError",
    "QuarantineError",
    "Row",
    "detect",
    "expand_files",
    "iter_shards",
    "read_corpus",
    "read_units",
    "summarize",
    "units_table",
    "validate_row",
]
