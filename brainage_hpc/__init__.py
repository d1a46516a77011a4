"""brainage-hpc: brain-age models on structural MRI at HPC scale."""
__version__ = "0.1.0"
__all__ = ["__version__"]
