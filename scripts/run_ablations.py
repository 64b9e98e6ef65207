"""Same as ``dim-mel ablations`` (``nel_model.ablations``); kept for existing commands."""
from nel_model.ablations import main

raise SystemExit(main())
