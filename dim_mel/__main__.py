"""``python -m dim_mel`` is the ``dim-mel`` command."""

from dim_mel.cli import main

raise SystemExit(main())
