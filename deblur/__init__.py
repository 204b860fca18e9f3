"""deblur: a high-throughput training system for the image-deblurring GAN of
"Research of Image Deblurring Based on the Deep Neural Network" (CelebA, 64x64)."""

__version__ = "0.1.0"
