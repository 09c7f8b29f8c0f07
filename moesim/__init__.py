"""moesim: a discrete-event simulator of Mixture-of-Experts inference systems."""

__version__ = "0.1.0"
