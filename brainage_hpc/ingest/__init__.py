"""Ingestion, offline: cohorts (HCP, synthetic), per-scan preprocessing, splits, shard writing.

Everything here turns scans into the sharded HDF5 set that :mod:`brainage_hpc.data`
reads online; nothing here runs inside a training step.
"""
