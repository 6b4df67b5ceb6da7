"""knowlip: distributed pretraining of SAR-KnowLIP."""
__version__ = "0.1.0"
