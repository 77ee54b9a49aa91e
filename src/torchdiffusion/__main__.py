"""``python -m torchdiffusion ...`` runs the command line (as under torchrun: ``torchrun ... -m torchdiffusion``)."""
import sys

from .app.cli import main

sys.exit(main())
