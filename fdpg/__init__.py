"""fdpg: f-divergence preference alignment engine."""

__version__ = "0.1.0"
