"""The shared code of the pruning book, in three parts.

- :mod:`utils.pruning`: **the pruning library**, the part to reuse in your own project
  (magnitude pruning, masks, the exact threshold, surgery, LLM pruning). It imports nothing of
  the other two.
- :mod:`utils.lab`: the book's lab kit (data, models, training, measurement, the toy LM).
- :mod:`utils.kit`: what only the book needs (exercise checks, plots, the benchmark).
"""

__version__ = "0.1.0"
