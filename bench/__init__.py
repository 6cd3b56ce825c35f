"""`make bench`: every row of one table measured in the same run against the same broker (table.py).

Not part of the shipped package (pyproject.toml lists the packages the wheel carries): benchmarks import
the pipeline, never the other way round."""
