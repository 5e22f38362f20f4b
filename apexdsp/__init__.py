"""apexdsp: a declarative pipeline compiler for multi-hop QA, built on DSPy."""
__version__ = "0.1.0"
