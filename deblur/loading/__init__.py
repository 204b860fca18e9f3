"""Reading the shards for training: the loader contract, the DALI graph and backend, the torch
backend, and :func:`deblur.loading.loader.make_loader` that picks one."""
