"""LLM pruning on real model families: tiny, randomly initialized transformers models built from
their configs (no download). Exact counts, masks in force through the model's own forward pass
and through training, the sequential driver equal to a naive re-run from the embedding, dtypes
kept, no copy of the model, and refusals for structures it cannot read."""

import copy

import pytest
import torch
from conftest import same_snapshot, snapshot
from torch import nn

from utils.pruning import effective_weight
from utils.pruning.decoder import find_blocks, transposed
from utils.pruning.llm import (
    InputStats,
    capture_inputs,
    default_layers,
    prune_llm,
    row_mask,
    sparsegpt_layer,
    wanda_scores,
)
from utils.pruning.masks import mask_of

T = pytest.importorskip("transformers")

VOCAB, HIDDEN, FF = 64, 32, 64
GQA = {"intermediate_size": FF, "num_key_value_heads": 2}  # 4 query heads, 2 key/value heads
FAMILIES = {  # family: (model class, config class, its own settings, where its blocks are)
    "llama": ("LlamaForCausalLM", "LlamaConfig", GQA, "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", GQA, "model.layers"),
    "mistral": ("MistralForCausalLM", "MistralConfig", GQA, "model.layers"),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        {"ffn_dim": FF, "word_embed_proj_dim": HIDDEN},
        "model.decoder.layers",
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {"bos_token_id": 0, "eos_token_id": 0},
        "transformer.h",
    ),  # transformers' Conv1D layers
    "gpt-neox": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {"intermediate_size": FF},
        "gpt_neox.layers",
    ),
}


def build(family: str, dtype=torch.float32, **extra) -> nn.Module:
    model_class, config_class, own, _ = FAMILIES[family]
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    config = getattr(T, config_class)(**settings | own | extra)
    torch.manual_seed(0)
    model = getattr(T, model_class)(config)
    with torch.no_grad():  # trained-looking scales instead of the initializer's 0.02
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def calib(n=6, length=12):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def rows_view(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (outputs, inputs), whatever the layer stores."""
    return t.T if transposed(module) else t


def logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_blocks_are_found(family):
    model = build(family)
    assert find_blocks(model) == FAMILIES[family][3]
    names = default_layers(model)
    assert names and all(n.startswith(FAMILIES[family][3] + ".") for n in names)
    assert len(names) % 2 == 0  # the same layers in each of the two blocks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt", "wanda+update"])
def test_exact_counts_and_masks_in_force(family, criterion):
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        model = build(family)
        keep = prune_llm(model, criterion=criterion, calibration=calib(), **kw)
        assert list(keep) == default_layers(model)
        modules = dict(model.named_modules())
        for name, k in keep.items():
            m = modules[name]
            k = rows_view(m, k)
            cols = k.shape[1]
            assert ((~k).sum(1) == cols // 2).all()
            assert (rows_view(m, effective_weight(m))[~k] == 0).all()
            if "nm" in kw:
                assert (k.reshape(k.shape[0], -1, 4).sum(-1) == 2).all()
        assert torch.isfinite(logits(model, calib(2))).all()
    # training with the model's own loss: pruned weights stay zero
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = calib(4)
    for _ in range(2):
        opt.zero_grad()
        model(x, labels=x, use_cache=False).loss.backward()
        opt.step()
    assert all((effective_weight(modules[n])[~k] == 0).all() for n, k in keep.items())


def naive(model: nn.Module, criterion: str, x: torch.Tensor, share: float, batch=16) -> dict:
    """The sequential procedure the slow way: for each block, the whole model is run again
    from the embedding (on a copy whose earlier blocks are already pruned)."""
    work, out = copy.deepcopy(model), {}
    stack = find_blocks(model)
    for i in range(len(work.get_submodule(stack))):
        names = [n for n in default_layers(work) if n.startswith(f"{stack}.{i}.")]
        layers = {n: work.get_submodule(n) for n in names}
        stats = capture_inputs(work, layers, x, batch_size=batch)
        for n, m in layers.items():
            w = rows_view(m, m.weight.detach())
            if criterion == "wanda":
                new, keep = w.clone(), row_mask(wanda_scores(w, stats[n].norms), share)
            else:
                new, keep = sparsegpt_layer(w, stats[n], share)
            out[n] = (rows_view(m, new * keep), rows_view(m, keep))
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(out[n][0])
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: a real attention-mask tensor
def test_sequential_equals_a_naive_rerun_from_the_embedding(family, criterion, attention):
    model, x = build(family, attn_implementation=attention), calib(7)
    want = naive(model, criterion, x, 0.5, batch=3)  # three batches, the last one short
    keep = prune_llm(model, 0.5, criterion, x, batch_size=3)
    modules = dict(model.named_modules())
    for n, (w, k) in want.items():
        assert torch.equal(keep[n], k), n
        assert torch.allclose(effective_weight(modules[n]), w, atol=1e-5), n
    # and block 1 really was calibrated on block 0 pruned: its inputs differ from the dense ones
    first = next(n for n in keep if n.startswith(find_blocks(model) + ".1."))
    dense = build(family, attn_implementation=attention)
    assert not torch.equal(naive_norms(dense, first, x), naive_norms(model, first, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_run_one_at_a_time_give_what_they_give_inside_the_model(family):
    from utils.pruning.decoder import catch_inputs, run_block

    model, x = build(family, attn_implementation="eager"), calib(5)
    stack = model.get_submodule(find_blocks(model))
    inside = []
    hooks = [b.register_forward_hook(lambda m, a, o: inside.append(o)) for b in stack]
    with torch.no_grad():
        model(x, use_cache=False)
    for h in hooks:
        h.remove()
    inputs = catch_inputs(model, stack, x, batch_size=16)
    for block, want in zip(stack, inside):
        inputs = run_block(block, inputs)
        got = inputs[0].hidden
        assert torch.allclose(got, want if torch.is_tensor(want) else want[0], atol=1e-6)


class Wrapped(nn.Module):
    """A user's wrapper whose forward takes ``**kwargs`` and has no config: the model inside
    builds a key/value cache unless told otherwise, which must not be carried along."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_a_cache_built_by_the_model_is_not_carried_from_block_to_block():
    plain, wrapped, x = build("llama"), Wrapped(build("llama")), calib()
    want = prune_llm(plain, 0.5, "sparsegpt", x)
    got = prune_llm(wrapped, 0.5, "sparsegpt", x)
    assert list(got) == ["inner." + n for n in want]
    assert all(torch.equal(got["inner." + n], k) for n, k in want.items())


def test_blocks_with_their_own_masks_are_refused():
    model = build(
        "qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match="other arguments than block 0"):
        prune_llm(model, 0.5, "wanda", calib())
    assert same_snapshot(before, snapshot(model))


def test_an_error_part_way_says_which_blocks_were_pruned(monkeypatch):
    import utils.pruning.llm as llm

    real, calls = llm.sparsegpt_layer, []

    def fail_in_block_1(weight, stats, *args, **kwargs):
        calls.append(1)
        if len(calls) > 7:  # block 0 has 7 layers
            raise ValueError("SparseGPT: the damped Hessian is not positive definite")
        return real(weight, stats, *args, **kwargs)

    monkeypatch.setattr(llm, "sparsegpt_layer", fail_in_block_1)
    model = build("llama")
    with pytest.raises(ValueError) as info:
        prune_llm(model, 0.5, "sparsegpt", calib())
    assert "the first 1 blocks" in " ".join(getattr(info.value, "__notes__", []))
    assert mask_of(model.model.layers[0].mlp.down_proj) is not None
    assert mask_of(model.model.layers[1].self_attn.q_proj) is None  # block 1 left as it was


class Experts(nn.Module):
    """A block whose experts are one 3-D tensor (as transformers fuses them), beside a Linear."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, h):
        return h + torch.einsum("btd,edf->btf", h, self.experts) * self.router(h).mean()


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)
        self.blocks = nn.ModuleList(Experts() for _ in range(2))

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_a_block_of_fused_experts_is_refused_unless_layers_are_named():
    m = MoE()
    before = snapshot(m)
    with pytest.raises(ValueError, match="not in Linear layers"):
        prune_llm(m, 0.5, "wanda", calib())
    assert same_snapshot(before, snapshot(m))
    keep = prune_llm(m, 0.5, "wanda", calib(), layers=["blocks.0.router", "blocks.1.router"])
    assert set(keep) == {"blocks.0.router", "blocks.1.router"}


def naive_norms(model, name, x):
    return capture_inputs(model, {name: model.get_submodule(name)}, x)[name].norms


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_model_dtype_is_kept(family, dtype):
    model = build(family, dtype)
    keep = prune_llm(model, 0.5, "sparsegpt", calib())
    for n in keep:
        m = model.get_submodule(n)
        assert effective_weight(m).dtype == dtype and mask_of(m).dtype == dtype
    assert torch.isfinite(logits(model, calib(2))).all()


def test_no_copy_and_wanda_keeps_only_the_diagonal(monkeypatch):
    model, other = build("llama"), build("llama")
    made = []
    real = InputStats.__init__

    def spy(self, features, device, full=True):
        made.append(full)
        real(self, features, device, full)

    monkeypatch.setattr(InputStats, "__init__", spy)
    monkeypatch.setattr(
        nn.Module, "__deepcopy__", lambda *a: pytest.fail("the model was copied"), raising=False
    )
    prune_llm(model, 0.5, "wanda", calib())
    assert made and not any(made)
    made.clear()
    prune_llm(other, 0.5, "sparsegpt", calib())
    assert made and all(made)


def test_the_cpu_model_pruned_block_by_block_on_a_named_device():
    a, b = build("llama"), build("llama")
    prune_llm(a, 0.5, "sparsegpt", calib())
    # "cpu:0" is not the model's torch.device("cpu"): each block is moved there and back
    keep = prune_llm(b, 0.5, "sparsegpt", calib(), device="cpu:0", blocks="model.layers")
    assert all(k.device == torch.device("cpu") for k in keep.values())
    assert all(p.device == torch.device("cpu") for p in b.parameters())
    for n, m in a.named_modules():
        if mask_of(m) is not None:
            assert torch.equal(effective_weight(m), effective_weight(b.get_submodule(n)))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_zeros_in_place_without_masks_give_the_same_weights(criterion):
    a, b = build("gpt2"), build("gpt2")
    keep = prune_llm(a, 0.5, criterion, calib())
    assert prune_llm(b, 0.5, criterion, calib(), install_masks=False) == {}
    for n in keep:
        m = b.get_submodule(n)
        assert mask_of(m) is None and torch.equal(m.weight, effective_weight(a.get_submodule(n)))


class Parallel(nn.Module):
    """Two blocks that both read the embedding: not a chain, so not prunable block by block."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        return self.head(sum(b(h) for b in self.blocks))


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.head(self.fc(self.emb(x)))


@pytest.mark.parametrize(
    "model,kwargs,match",
    [
        (NoBlocks, {}, "blocks="),
        (Parallel, {}, "does not receive"),
        (lambda: build("llama"), {"blocks": "model.norm"}, "not a non-empty ModuleList"),
        (lambda: build("llama"), {"layers": ["lm_head"]}, "outside the blocks"),
        (lambda: build("llama"), {"damp": 0.0}, "damp"),
        (
            lambda: nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2
            ),
            {"layers": ["layers.0.self_attn.out_proj"]},
            "MultiheadAttention",
        ),
    ],
    ids=["no blocks", "not a chain", "blocks not a list", "outside", "damp", "mha out_proj"],
)
def test_structures_it_cannot_read_are_refused_and_nothing_changes(model, kwargs, match):
    m = model()
    before = snapshot(m)
    with pytest.raises(ValueError, match=match):
        prune_llm(m, 0.5, "wanda", calib(), **kwargs)
    assert same_snapshot(before, snapshot(m))


# ----------------------------------------------------------------------------- structured
LLAMA_STYLE = ["llama", "qwen2", "mistral"]


def masked_copy(model, kept):
    """The unshrunk model with the removed units' weights zeroed: what shrinking must equal."""
    from utils.pruning.decoder_units import groups_of

    m = copy.deepcopy(model)
    with torch.no_grad():
        for block, neurons, groups in zip(m.model.layers, kept["neurons"], kept["groups"]):
            mlp, attn = block.mlp, block.self_attn
            off = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
            off[neurons] = False
            mlp.gate_proj.weight[off] = 0
            mlp.up_proj.weight[off] = 0
            mlp.down_proj.weight[:, off] = 0
            d, per = attn.head_dim, attn.num_key_value_groups
            gone = [g for g in range(groups_of(attn)) if g not in groups.tolist()]
            for g in gone:
                attn.k_proj.weight[g * d : (g + 1) * d] = 0
                attn.v_proj.weight[g * d : (g + 1) * d] = 0
                q = slice(g * per * d, (g + 1) * per * d)
                attn.q_proj.weight[q] = 0
                attn.o_proj.weight[:, q] = 0
    return m


@pytest.mark.parametrize("family", LLAMA_STYLE)
@pytest.mark.parametrize("calibrated", [True, False])
def test_swiglu_neurons_and_kv_groups_shrink_to_the_masked_outputs(family, calibrated):
    from utils.pruning.decoder_units import prune_units, unit_scores

    model, x = build(family), calib()
    scores = unit_scores(model, x if calibrated else None)
    before = copy.deepcopy(model)
    kept = prune_units(model, 0.5, 0.5, scores)
    assert [len(k) for k in kept["neurons"]] == [FF // 2] * 2
    assert [len(k) for k in kept["groups"]] == [1, 1]  # 2 key/value groups, one stays
    for block in model.model.layers:
        assert block.mlp.gate_proj.out_features == FF // 2 == block.mlp.down_proj.in_features
        assert block.self_attn.q_proj.out_features == 2 * block.self_attn.head_dim
        assert block.self_attn.k_proj.out_features == block.self_attn.head_dim
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) < params(before)
    assert torch.allclose(logits(model, x), logits(masked_copy(before, kept), x), atol=1e-5)
    # the kept units are the best-scored ones
    for s, k in zip(scores["neurons"], kept["neurons"]):
        off = torch.ones(len(s), dtype=torch.bool)
        off[k] = False
        assert s[k].min() >= s[off].max()


def test_block_distances_and_dropping_blocks_equal_skipping_them():
    from utils.pruning.decoder_units import block_distances, drop_blocks

    torch.manual_seed(0)
    config = T.Qwen2Config(  # Qwen2: its config lists a type per layer, which must follow
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model, x = T.Qwen2ForCausalLM(config).eval(), calib()
    dist = block_distances(model, x)
    assert dist.shape == (4,) and ((dist >= 0) & (dist <= 1)).all()
    drop = torch.argsort(dist)[:2].tolist()
    skipped = copy.deepcopy(model)
    for i in drop:  # a block made the identity: its output is its input
        skipped.model.layers[i].register_forward_hook(lambda m, a, k, o: a[0], with_kwargs=True)
    want = logits(skipped, x)
    drop_blocks(model, torch.argsort(dist)[:2])  # a tensor of indices, as argsort gives
    assert len(model.model.layers) == 2 == model.config.num_hidden_layers
    assert len(model.config.layer_types) == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert torch.allclose(logits(model, x), want, atol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: _units().unit_scores(build("gpt2")), "Llama-style"),
        (lambda m: _units().prune_units(m, 1.0, 0.5, _units().unit_scores(m)), "neuron_ratio"),
        (lambda m: _units().prune_units(m, 0.5, 0.5, {"neurons": [], "groups": []}), "sizes"),
        (lambda m: _units().drop_blocks(m, [0, 1]), "every block"),
        (lambda m: _units().drop_blocks(m, [5]), "indices"),
        (lambda m: _units().drop_blocks(m, True), "indices"),
    ],
    ids=["not llama-style", "ratio", "scores", "all blocks", "index", "bool"],
)
def test_structured_bad_calls_change_nothing(call, match):
    m = build("llama")
    before = snapshot(m)
    with pytest.raises(ValueError, match=match):
        call(m)
    assert same_snapshot(before, snapshot(m)) and len(m.model.layers) == 2


def _units():
    from utils.pruning import decoder_units

    return decoder_units


def test_causal_lm_perplexity_is_exp_of_the_mean_loss_over_segments():
    from utils.lab.lm import causal_lm_perplexity

    model = build("llama")
    ids = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(3))
    losses = []
    for i in range(3):  # three segments of 16; the last two tokens are dropped
        x = ids[16 * i : 16 * (i + 1)][None]
        with torch.no_grad():
            out = model(x, use_cache=False).logits[0, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(out, x[0, 1:], reduction="sum"))
    want = float(torch.stack(losses).sum() / (3 * 15))
    assert abs(causal_lm_perplexity(model, ids, 16) - torch.tensor(want).exp().item()) < 1e-3
    with pytest.raises(ValueError, match="at least"):
        causal_lm_perplexity(model, ids[:10], 16)
