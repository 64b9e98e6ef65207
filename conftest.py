"""Makes the repository root importable for the tests (``data_process``, ``nel_model``)."""
