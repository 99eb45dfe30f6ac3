"""``python -m storydiff.cli`` (also what ``torchrun -m storydiff.cli`` runs)."""

from . import main

raise SystemExit(main())
