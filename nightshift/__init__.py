"""nightshift: run a heavy container job on a machine that exists only while it runs."""

__version__ = "0.1.0"
