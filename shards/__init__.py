"""The on-disk shard layer: plan, storage, Parquet shard format, manifest and ledger.

Nothing here imports TensorFlow or Ray: the embed driver, the trainer, `status` and the
tests all use these modules, and they answer in milliseconds.
"""
