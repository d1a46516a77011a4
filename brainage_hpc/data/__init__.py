"""Data, online: the shard format and reader, the lazy dataset, sampler, loader and transforms.

What feeds training and evaluation. Turning scans into shards is :mod:`brainage_hpc.ingest`.
"""
