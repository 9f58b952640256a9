"""`make bench` and `make bench-gpu`: speed and memory figures of the real paths (`python -m
pipeline.bench`, see `pipeline.bench.run`). Nothing of the product imports this package."""
