"""The pruning library: what you can reuse in your own project.

It imports torch and numpy (pandas for ``sparsity_report`` only; the compiled loops of large
models are C, built with the system's compiler on first use), and nothing of the book's lab
kit (``utils.lab``) or book kit (``utils.kit``); a test enforces that.

- :mod:`~utils.pruning.magnitude`: equations 3.1 (unstructured) and 3.2 (structured), fixed;
  2:4 masks; sparsity reports. Re-exported here.
- :mod:`~utils.pruning.masks`: masks as ``torch.nn.utils.parametrize`` parametrizations.
- :mod:`~utils.pruning.threshold`: the exact k-th smallest score over many tensors, chunked.
- :mod:`~utils.pruning.kernels`: compiled loops (C, built on first use) for large models.
- :mod:`~utils.pruning.graph`: the torch.fx data flow (output layers, BatchNorms, flattens).
- :mod:`~utils.pruning.surgery`: ``shrink``, a physically smaller copy of a pruned model.
- :mod:`~utils.pruning.modes`: ``eval_mode``, a block in eval mode, the mode restored after.
- :mod:`~utils.pruning.llm`: one-shot pruning of transformer LMs (magnitude, Wanda, SparseGPT),
  block by block, on the book's LM and on Hugging Face decoders.
- :mod:`~utils.pruning.decoder`: a decoder's block stack, found generically and run block by block.
- :mod:`~utils.pruning.decoder_units`: SwiGLU neurons, key/value head groups and whole blocks of
  Llama-style models removed (the model shrunk).
"""

from utils.pruning import masks
from utils.pruning.magnitude import (
    WeightGroup,
    check_share,
    clone_model,
    effective_weight,
    is_pruned,
    make_permanent,
    prune_structured,
    prune_unstructured,
    select_layers,
    semi_structured_mask,
    smallest_k,
    sparsity,
    sparsity_report,
    unit_norms,
    unit_rows,
    weight_and_mask,
    weight_tensors,
)
from utils.pruning.surgery import UnsupportedGraphError, shrink

__all__ = [
    "UnsupportedGraphError",
    "WeightGroup",
    "check_share",
    "clone_model",
    "effective_weight",
    "is_pruned",
    "make_permanent",
    "masks",
    "prune_structured",
    "prune_unstructured",
    "select_layers",
    "semi_structured_mask",
    "shrink",
    "smallest_k",
    "sparsity",
    "sparsity_report",
    "unit_norms",
    "unit_rows",
    "weight_and_mask",
    "weight_tensors",
]
