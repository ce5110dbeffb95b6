"""What only the book needs: exercise checks, plots, the benchmark and the source's listings.

- :mod:`~utils.kit.checks`, :mod:`~utils.kit.checks_llm`: the exercises' checks (pass or FAIL).
- :mod:`~utils.kit.plots`: the chapters' figures.
- :mod:`~utils.kit.benchmark`: ``python -m utils.kit.benchmark``, the timings in the README.
- :mod:`~utils.kit.source_listings`: the source document's code as printed, for comparison.
"""
