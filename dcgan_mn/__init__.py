"""dcgan_mn: DCGAN on CIFAR-10 with Mixture Normalization, and an FID evaluator."""

__version__ = "0.1.0"
