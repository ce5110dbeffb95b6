"""Masks as parametrizations (utils.pruning.masks): in force wherever the weight is read."""

import copy
import io

import pytest
import torch
from torch import nn

from utils.lab.measure import count_params
from utils.pruning import (
    clone_model,
    is_pruned,
    make_permanent,
    masks,
    prune_structured,
    prune_unstructured,
    sparsity,
)
from utils.pruning.graph import output_layers

OPTIMIZERS = {
    "sgd+momentum+decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.05),
}


def attention_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    )


def test_a_masked_out_proj_is_in_force_inside_multihead_attention():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj's forward: a
    forward pre-hook mask never ran there; the parametrization computes the masked weight."""
    model = attention_model().eval()
    attn = model[0].self_attn
    keep = prune_unstructured(model, 0.5, layers=["0.self_attn.out_proj"])["0.self_attn.out_proj"]
    x = torch.randn(4, 5, 16)
    reference = copy.deepcopy(model)
    make_permanent(reference)
    with torch.no_grad():
        reference[0].self_attn.out_proj.weight.mul_(keep)
        dense = copy.deepcopy(reference)
        dense[0].self_attn.out_proj.weight.copy_(masks.stored(attn.out_proj))
        assert torch.allclose(model(x), reference(x), atol=1e-6)
        assert not torch.allclose(model(x), dense(x), atol=1e-3)  # the mask changes the output


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_masks_stay_in_force_under_every_optimizer_and_inside_attention(name):
    model = attention_model().train()
    with pytest.warns(UserWarning, match="in_proj_weight"):  # its packed q/k/v stay dense
        keeps = prune_unstructured(model, 0.7)
    opt = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(8, 5, 16), torch.randint(0, 3, (8,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for layer, keep in keeps.items():
        weight = model.get_submodule(layer).weight
        assert (weight[~keep] == 0).all(), layer
        assert (
            masks.stored(model.get_submodule(layer))[~keep] != 0
        ).any()  # the optimizer moved them
    assert sparsity(model) >= 0.7


def test_state_dict_round_trip_deepcopy_and_compile():
    model = attention_model().eval()
    with pytest.warns(UserWarning, match="in_proj_weight"):
        prune_unstructured(model, 0.5)
    x = torch.randn(2, 5, 16)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = attention_model().eval()
    with pytest.warns(UserWarning, match="in_proj_weight"):
        prune_unstructured(fresh, 0.0)  # the same parametrizations, masks all ones
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh(x), want)
    assert torch.equal(copy.deepcopy(model)(x), want) and torch.equal(clone_model(model)(x), want)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(x), want, atol=1e-6)


def test_make_permanent_keeps_the_parameter_objects_and_a_plain_state_dict():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    before = {id(p) for p in model.parameters()}
    prune_unstructured(model, 0.5)
    assert {id(p) for p in model.parameters()} == before  # an optimizer built before still works
    make_permanent(model)
    assert not is_pruned(model) and type(model[0]) is nn.Linear
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert {id(p) for p in model.parameters()} == before


def test_tied_weights_stay_tied_through_masks_and_folding():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    prune_unstructured(model, 0.5)
    assert masks.stored(first) is masks.stored(second)
    assert torch.equal(masks.mask_of(first), masks.mask_of(second))
    make_permanent(model)
    assert model[0].weight is model[2].weight


def test_only_our_masks_count_and_foreign_parametrizations_are_refused():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2))
    assert not masks.is_masked(layer) and masks.has_foreign_parametrization(layer)
    assert not is_pruned(model)
    with pytest.raises(ValueError, match="computed"):
        prune_unstructured(model, 0.5)
    assert not masks.is_masked(model[2])  # nothing changed


def test_a_torch_prune_model_gets_a_clear_refusal():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        prune_unstructured(model, 0.5)
    assert not masks.is_masked(model[2])


def test_other_parametrizations_elsewhere_do_not_break_pruning_or_counting():
    """weight_norm keeps two originals (original0, original1): a layer using it, not selected,
    neither breaks the shared-weight check nor the count of non-zero parameters."""
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))
    )
    prune_unstructured(model, 0.5, layers=["0"])
    assert masks.is_masked(model[0]) and not masks.is_masked(model[2])
    assert count_params(model, nonzero=True) == 8 + 4 + count_params(model[2], nonzero=True)


def test_a_tied_weight_is_counted_once_by_count_params():
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    assert count_params(model) == count_params(model, nonzero=True) == 16
    prune_unstructured(model, 0.5)
    assert count_params(model, nonzero=True) == 8


def test_structured_pruning_refuses_an_unmaskable_batchnorm_before_masking_anything():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    )
    nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        prune_structured(model, 0.5)
    assert not is_pruned(model)


def test_set_mask_copies_the_callers_tensor_and_checks_the_shape():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    keep = torch.ones(3, 3)
    masks.set_mask(a, "weight", keep)
    masks.set_mask(b, "weight", keep)
    masks.set_mask(a, "weight", torch.zeros(3, 3))  # re-pruning one model ...
    assert (
        masks.mask_of(b).sum() == 9 and keep.sum() == 9
    )  # ... leaves the other and the caller alone
    with pytest.raises(ValueError, match="shape"):
        masks.set_mask(a, "weight", torch.ones(3, 1))
    with pytest.raises(ValueError, match="shape"):
        masks.set_mask(nn.Linear(3, 3), "weight", torch.ones(3, 1))


class Head(nn.Linear):
    """A user's subclass of Linear: fx traced through it; a mask must not change the graph."""

    def forward(self, x):
        return super().forward(x) * 2


def test_the_output_layer_is_the_same_before_and_after_masking_a_linear_subclass():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Head(8, 3))
    heads_before = output_layers(model)
    prune_unstructured(model, 0.5)
    assert output_layers(model) == heads_before == {"2"}
    head_mask = masks.mask_of(model[2]).clone()
    prune_structured(model, 0.5)  # the head (the classes) is not touched
    assert torch.equal(masks.mask_of(model[2]), head_mask)


def test_one_shot_llm_pruning_refuses_torch_prune_and_shared_weights_before_any_change():
    from utils.pruning.llm import prune_magnitude

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        prune_magnitude(model, 0.5)
    assert not is_pruned(model)
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared"):
        prune_magnitude(tied, 0.5)
    assert not is_pruned(tied)


def test_shrink_refuses_dead_units_inside_a_module_fx_keeps_whole():
    from utils.pruning import UnsupportedGraphError, shrink

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    )
    with pytest.warns(UserWarning, match="in_proj_weight"):
        prune_unstructured(model, 0.3)  # the packed q/k/v weights are said to stay dense
    prune_structured(model, 0.5, layers=["0.linear1"])
    with pytest.raises(UnsupportedGraphError, match="0.linear1"):
        shrink(model)


def test_a_masked_state_dict_loads_into_a_plain_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_structured(model, 0.5)
    x = torch.randn(3, 4)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    masks.load_state_dict(fresh, model.state_dict())
    assert torch.equal(fresh(x), model(x)) and masks.is_masked(fresh[0], "bias")
    with pytest.raises(ValueError, match="only 0 and 1"):
        masks.set_mask(fresh[2], "weight", torch.full((2, 8), 0.5))
