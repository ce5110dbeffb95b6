"""The source's unstructured pruning function (its section 4.1), kept as printed for comparison.

Only the missing ``numpy`` import is added here (defect 1), so that it can be run and
timed; every other defect is left in place on purpose. Chapters 4.1 and 4.2 show what
goes wrong (4.2 prints the structured listing itself); :mod:`utils.pruning` holds the fixed versions.
"""

import numpy as np
import torch  # noqa: F401  (the listing's own import)


def unstructured_pruning(model, pruning_ratio):
    all_weights = []
    for p in model.parameters():
        if len(p.data.size()) != 1:
            all_weights += list(p.cpu().data.abs().numpy().flatten())
    threshold = np.percentile(np.array(all_weights), pruning_ratio * 100)

    for p in model.parameters():
        if len(p.data.size()) != 1:
            mask = p.data.abs() > threshold
            p.data.mul_(mask.float())
