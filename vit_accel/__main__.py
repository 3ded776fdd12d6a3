"""`python -m vit_accel ...` (what torchrun and the launchers run)."""
from .cli import entry

entry()
