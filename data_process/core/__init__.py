"""The small shared core that every stage and ``nel_model`` import; it imports no stage.

``records`` (typed unified records, JSON Lines I/O with validation), ``durable_io`` (atomic writes, append-only
caches), ``settings`` (YAML settings files), ``fingerprints`` (cache keys, image content hashes), ``images`` (the one
image decoder and worker loader), ``placement`` (how a new dataset folder reaches its source's images), ``devices``
(the one device resolver).
"""
