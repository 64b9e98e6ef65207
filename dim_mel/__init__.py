"""The ``dim-mel`` command: one entry point for every step of the toolkit (see ``dim_mel.cli``)."""
