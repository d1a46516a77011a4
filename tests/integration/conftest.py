"""Fixtures of the integration tests: the local SLURM cluster and its job bookkeeping."""

from tests.integration.slurm_fixtures import slurm_cluster, slurm_jobs  # noqa: F401  (pytest fixtures)
