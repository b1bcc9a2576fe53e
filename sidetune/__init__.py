"""sidetune: the command line, the demo and the benchmarks (they start both sides)."""

__version__ = "0.1.0"
