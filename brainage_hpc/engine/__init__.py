"""Training engine: distributed setup, backends, trainer loop, checkpoints, logging."""
