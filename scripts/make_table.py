"""Same as ``dim-mel table`` (``nel_model.tables``); kept for existing commands."""
from nel_model.tables import main

raise SystemExit(main())
