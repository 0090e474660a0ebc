"""gmp-dist: Global Magnitude Pruning with the Minimum Threshold, at scale."""

__version__ = "0.1.0"
