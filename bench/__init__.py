"""pvfast benchmarks (`python -m pytest bench`); not installed with the package."""
