"""Same as ``dim-mel plot`` (``nel_model.plots``); kept for existing commands."""
from nel_model.plots import main

raise SystemExit(main())
