"""Training: config, the GAN step, checkpoints, and the loop with its named pieces
(:func:`deblur.training.loop.train`)."""
