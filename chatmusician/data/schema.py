"""The columns that reading a work item emits (sources.py) and tokenizing consumes (tokenize.py): one schema,
in a module of its own so the pure tokenize code does not import the I/O code."""

from __future__ import annotations

import pyarrow as pa

READ_COLUMNS = ("row_id", "src", "reject", "repeats", "is_score", "text", "source", "target")
READ_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("src", pa.string()),
        ("reject", pa.string()),
        ("repeats", pa.int32()),
        ("is_score", pa.bool_()),
        ("text", pa.large_string()),
        ("source", pa.large_string()),
        ("target", pa.large_string()),
    ]
)
