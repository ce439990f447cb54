"""The write side: what a DMP call becomes, and how it reaches the store.

It reads top to bottom like the read path: ``api`` (the DMP's HTTP calls; ``sync`` for the
user-sync cookie and signatures) validates a call into ``entries`` (``batches`` decodes and
checks micro-batches, ``dropfiles`` the Mapp drop files), hands them to a log, the node's
``local`` ingestion process (single node: ``write_queue`` commits and fsyncs before the 2xx)
or ``jetstream`` (replicated: a JetStream stream, and the node's applier), and
``entries.apply_all`` writes them through ``store.writer``, the only writer. Replicated nodes
also move whole stores through ``objectstore``: ``replicated_snapshots`` (``load --replace``) and
``checkpoints`` (bootstrap of a new node).
"""
