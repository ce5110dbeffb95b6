"""The seed's two pruning functions (its section 4), kept as printed for comparison.

Only the missing ``numpy`` import is added here (defect 1), so that they can be run and
timed; every other defect is left in place on purpose. Chapters 4.1 and 4.2 show what
goes wrong; :mod:`utils.pruning` holds the fixed versions.
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


def structured_pruning(model, pruning_ratio):
    for name, p in model.named_parameters():
        if 'weight' in name:
            tensor = p.data.cpu().numpy()
            norm = np.linalg.norm(tensor, axis=0)
            threshold = np.percentile(norm, pruning_ratio * 100)
            mask = norm > threshold
            mask = np.expand_dims(mask, axis=0)
            p.data.mul_(torch.tensor(mask, dtype=torch.float32).to(p.device))
