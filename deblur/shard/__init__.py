"""Building the dataset: planning the sources, blurring, writing and verifying WebDataset shards.

``python -m deblur.shard`` is :func:`deblur.shard.build.main`; :mod:`deblur.shard.format` is
the on-disk contract every reader relies on.
"""
