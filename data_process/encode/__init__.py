"""Stage 3, encode: a unified dataset -> a feature cache (``features``, ``encoders``, ``feature_store``).
Imports ``data_process.core`` and the earlier stages, never ``nel_model``."""
