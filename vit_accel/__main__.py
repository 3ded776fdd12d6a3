"""`python -m vit_accel ...` (what torchrun and the launchers run)."""
import sys

from .cli import main

sys.exit(main())
