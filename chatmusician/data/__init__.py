"""The data stage: sources (hub ids, parquet/jsonl/json/ABC files, mixtures), tokenize and pack functions
(pure, usable without Ray), and the Ray Data pipeline that streams them into training rows or parquet shards.

Import the pieces from their modules: ``chatmusician.data.config`` (TokenizeConfig), ``.pipeline``
(build_dataset, write_shards, read_shards), ``.tokenize`` and ``.packing`` (pure functions).
"""
