"""The embed half: a source becomes a listing, the listing becomes teacher-embedding shards.

``listing`` (+ ``recordio``) writes ``listing.parquet``; ``run`` drives the teacher actors
(``distill.workers.embed_actor``) over the shard plan with the ledger and writes the shards
and ``manifest.json``; ``status``, ``ledger_cli`` and ``export_npy`` read what it wrote.
It shares ``distill.shards``, ``distill.teacher``, ``distill.images`` and ``distill.views``
with the train half and never imports ``distill.train``.
"""
