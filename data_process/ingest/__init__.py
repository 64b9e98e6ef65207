"""Stage 1, ingest: public MEL releases -> validated unified dataset folders (``readers/``, ``prepare``,
``validate``). Imports only ``data_process.core``."""
