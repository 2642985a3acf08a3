"""The on-disk shard layer: plan, Parquet shard format and reader, manifest, leases and ledgers
(files it reaches through ``distill.storage``).

Nothing here imports TensorFlow or Ray: the embed driver, the trainer, `status` and the
tests all use these modules, and they answer in milliseconds.
"""
