"""Data side of the toolkit, one sub-package per stage; data flows one way::

    core  <-  ingest  <-  augment  <-  encode  <-  nel_model (the model)

``core`` (records, durable I/O, images, fingerprints, devices) is imported by everything; each stage imports only
the core and the stages before it. ``fixtures`` (synthetic data, tiny models) serves the demo and the tests.
See docs/ARCHITECTURE.md.
"""
