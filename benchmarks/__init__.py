"""Performance benchmarks of brainage-hpc (DESIGN.md section 7); ``python -m benchmarks.run_all``."""
