"""alexops: AlexNet (Krizhevsky, Sutskever, Hinton 2012) as an end-to-end MLOps pipeline."""

__version__ = "0.1.0"
