"""The data stage: sources (hub ids pinned to a commit, parquet/jsonl/json/ABC files, mixtures), tokenize and
pack functions (pure, usable without Ray), and the Ray Data pipeline that streams them into training rows or
parquet shards.

Modules, one thing each: ``config`` (TokenizeConfig), ``plan`` (sources -> work items), ``hub`` (revisions),
``retry`` (transient read errors), ``sources`` (reading and validating rows, mixture draws), ``schema``,
``tokenize`` and ``packing`` (pure), ``stages`` (the Ray tasks), ``shards`` (writer, merge), ``stats``,
``pipeline`` (build_dataset, write_shards, read_shards, run) and ``manifest``: the contract a trainer reads
(shard_plan, check_shards, tokenizer_fingerprint, resolve), which imports none of the others.
"""
