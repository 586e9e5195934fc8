"""The run: the pipeline, ``RunContext``, ``Quantizer``, plugin-failure attribution, checks before any
weight changes, export and the report."""
