"""Embedding matrices in tables: one list column of float16, stacked on read."""

from __future__ import annotations

import numpy as np
import pandas as pd

EMBEDDING_COLUMN = "embedding"


def embedding_column(matrix: np.ndarray) -> list[np.ndarray]:
    """Rows of an ``[N, D]`` matrix as a column value (stored as Parquet list<float16>)."""
    matrix = np.asarray(matrix, dtype=np.float16)
    return list(matrix)


def embedding_matrix(df: pd.DataFrame, column: str = EMBEDDING_COLUMN, dim: int | None = None) -> np.ndarray:
    """``[N, D]`` float32 from a table's embedding list column (missing rows become
    zeros), or from wide ``emb_0 … emb_<D-1>`` columns."""
    if column not in df.columns:
        cols = sorted((c for c in df.columns if c.startswith("emb_") and c[4:].isdigit()), key=lambda c: int(c[4:]))
        if not cols:
            raise ValueError(f"no {column!r} list column and no emb_<i> columns in the table")
        return df[cols].to_numpy(dtype=np.float32)
    values = df[column].to_numpy() if len(df) else np.empty(0, dtype=object)
    if dim is None:
        dim = next((len(v) for v in values if v is not None), 0)
    if len(values) and all(v is not None and len(v) == dim for v in values):
        return np.stack(values).astype(np.float32)
    out = np.zeros((len(values), dim), dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None and len(v):
            out[i] = v
    return out
