"""Backend-agnostic training: schedule, optimizer groups, trainer loop, run directory, logging."""
