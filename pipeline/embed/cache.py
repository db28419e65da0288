"""Embeddings cached as Parquet, keyed by unit id and backbone fingerprint.

Training the heads reads embeddings many times; computing them is the expensive part. A cache
file holds one row per unit (unit_id, response, prompt as fixed-size float32 lists) and records
the backbone fingerprint in the schema metadata and in a column; a reader asking for another
fingerprint is refused, so embeddings of different weights never mix.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.embed.engine import Embeddings

FINGERPRINT_KEY = b"armolabel.backbone_fingerprint"
HIDDEN_SIZE_KEY = b"armolabel.hidden_size"


class EmbeddingCacheMismatch(ValueError):
    """The cache was written with another backbone (or is not an embedding cache)."""


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def write_embedding_cache(uri: str, unit_ids: Sequence[str], embeddings: Embeddings, backbone_fingerprint: str,
                          storage_options: dict | None = None) -> None:
    """Write (atomically, local or s3) one Parquet file of embeddings for `unit_ids`, in that order."""
    n = len(unit_ids)
    if embeddings.response.shape[0] != n or embeddings.prompt.shape != embeddings.response.shape:
        raise ValueError(f"{n} unit ids but embeddings of shapes {embeddings.response.shape} and {embeddings.prompt.shape}")
    if len(set(unit_ids)) != n:
        raise ValueError("unit ids must be unique in an embedding cache")
    if not backbone_fingerprint:
        raise ValueError("backbone_fingerprint is empty")
    hidden = int(embeddings.response.shape[1])
    table = pa.table({
        "unit_id": pa.array(list(unit_ids), pa.string()),
        "backbone_fingerprint": pa.array([backbone_fingerprint] * n, pa.string()),
        "response": _vectors(embeddings.response),
        "prompt": _vectors(embeddings.prompt),
    }).replace_schema_metadata({FINGERPRINT_KEY: backbone_fingerprint.encode(),
                                HIDDEN_SIZE_KEY: str(hidden).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_atomic(uri, buffer.getvalue(), storage_options)


def read_embedding_cache(uri: str, backbone_fingerprint: str, storage_options: dict | None = None
                         ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit_ids, response [N, H] float32, prompt [N, H] float32); raises EmbeddingCacheMismatch
    when the cache was written for another backbone fingerprint."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)))
    meta = table.schema.metadata or {}
    if FINGERPRINT_KEY not in meta:
        raise EmbeddingCacheMismatch(f"{uri} is not an armolabel embedding cache (no backbone fingerprint)")
    found = meta[FINGERPRINT_KEY].decode()
    if found != backbone_fingerprint:
        raise EmbeddingCacheMismatch(
            f"embedding cache {uri} was computed with backbone {found}, not {backbone_fingerprint}: "
            "recompute the embeddings (or point at the cache of this backbone)")
    hidden = int(meta[HIDDEN_SIZE_KEY])
    n = table.num_rows

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, hidden)

    return table.column("unit_id").to_pylist(), matrix("response"), matrix("prompt")
