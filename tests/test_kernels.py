"""The compiled loops of utils.pruning.kernels: the same results as numpy and as the eager path."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import utils.pruning.threshold
from utils.pruning import kernels, prune_unstructured

needs_loops = pytest.mark.skipif(
    not kernels.available(), reason=f"no compiled loops: {kernels.why_not()}"
)
DTYPES = (np.float32, np.float64)


def values(dtype):
    """Arrays with zeros of both signs, ties, tiny and huge values and infinities."""
    special = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1e-30, -1e-30, 3e38, np.inf, -np.inf])
    element = st.one_of(special, st.floats(-2, 2, width=32))
    return st.lists(element, min_size=0, max_size=300).map(lambda v: np.array(v, dtype))


bounds = st.one_of(
    st.sampled_from([-np.inf, -1.0, -0.0, 0.0, 0.5, 1e-30, 3e38, np.inf]), st.floats(-1, 2.5)
)


@needs_loops
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_band_counts_and_gathers_like_numpy(dtype, data):
    x, lo, hi = data.draw(values(dtype)), data.draw(bounds), data.draw(bounds)
    a, lo_, hi_ = np.abs(x), dtype(lo), dtype(hi)
    at_most_lo, positions, found = kernels.band(x, lo, hi)
    inside = (a > lo_) & (a < hi_)
    assert at_most_lo == np.count_nonzero(a <= lo_)
    assert np.array_equal(positions, np.flatnonzero(inside)) and np.array_equal(found, a[inside])
    assert found.dtype == dtype


@needs_loops
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_zero_below_and_keep_flags_like_numpy(dtype, data):
    x, value = data.draw(values(dtype)), data.draw(bounds)
    small = np.abs(x) < dtype(value)
    flags = np.full_like(x, 7)
    assert kernels.keep_flags(x, value, flags) == np.count_nonzero(~small)
    assert np.array_equal(flags, (~small).astype(dtype))
    y = x.copy()
    assert kernels.zero_below(y, value) == np.count_nonzero(small)
    zeroed = np.where(small, np.copysign(dtype(0), x), x)  # -0.0 where a negative one is zeroed
    assert np.array_equal(y.view(f"u{y.itemsize}"), zeroed.view(f"u{y.itemsize}"))


@needs_loops
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_loops_split_long_arrays_over_threads_in_order(monkeypatch, threads):
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: threads)
    x = np.random.default_rng(0).standard_normal((1 << 17) * 3 + 5).astype(np.float32)
    assert kernels._threads(x.size) == threads
    a = np.abs(x)
    for lo, hi in ((0.1, 0.2), (0.0, 5.0)):  # the second holds the whole array: room remade
        at_most_lo, positions, found = kernels.band(x, lo, hi)
        inside = (a > np.float32(lo)) & (a < np.float32(hi))
        assert at_most_lo == np.count_nonzero(a <= np.float32(lo))
        assert np.array_equal(positions, np.flatnonzero(inside))
        assert np.array_equal(found, a[inside])
    flags = np.empty_like(x)
    assert kernels.keep_flags(x, 0.5, flags) == np.count_nonzero(a >= 0.5)
    y = x.copy()
    assert kernels.zero_below(y, 0.5) == np.count_nonzero(a < 0.5)
    assert np.array_equal(y, np.where(a < 0.5, 0, x)) and np.array_equal(flags, a >= 0.5)


@needs_loops
@pytest.mark.parametrize("dtype", DTYPES)
def test_band_refuses_nan_and_infinities_when_asked(dtype):
    for bad in (np.nan, np.inf, -np.inf):
        x = np.array([0.5, bad, 0.25], dtype)
        kernels.band(np.abs(x[[0, 2]]), 0.0, 1.0, finite=True)
        with pytest.raises(kernels.NotFinite):
            kernels.band(x, 0.0, 1.0, finite=True)


@needs_loops
def test_loops_refuse_what_they_cannot_read():
    for bad in (
        np.zeros(4, np.float16),
        np.zeros((2, 2), np.float32),
        np.zeros(8, np.float32)[::2],
    ):
        with pytest.raises(ValueError, match="1-D contiguous float32 or float64"):
            kernels.band(bad, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        kernels.keep_flags(np.zeros(4, np.float32), 0.5, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="float32 array"):
        kernels.keep_flags(np.zeros(4, np.float32), 0.5, np.zeros(4, np.float64))


def mixed_model(seed, dtype, ties, channels_last):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(36, 10, bias=False),
        nn.Linear(10, 10),
        nn.Linear(10, 10),
    ).to(dtype)
    if seed % 2:
        model[5].weight = model[4].weight  # a shared tensor, counted once
    return dressed(model, ties, channels_last, levels=3)


def dressed(model, ties, channels_last, levels):
    """``model`` in channels_last memory order, and with weights on a grid of 2 * levels + 1
    values (many exact ties), where asked."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ties:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-levels, levels + 1, p.shape) / (levels + 1))
    return model


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """Let the compiled loops serve even small models, and count their calls."""
    calls = []
    band = kernels.band
    monkeypatch.setattr(kernels, "band", lambda *a, **k: calls.append(a) or band(*a, **k))
    with utils.pruning.threshold.tuned(kernels_from=0):
        yield calls


def big_model(seed, dtype, ties, channels_last):
    """Over tuning().small weights (so a sampled bracket) and several blocks per layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(7, 389, 7, bias=False), nn.Flatten(), nn.Linear(401, 397)).to(
        dtype
    )
    return dressed(model, ties, channels_last, levels=40)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: torch.equal takes -0.0 for 0.0."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def assert_both_paths_agree(make, ratio, scope, inplace):
    eager, compiled = make(), make()
    expected = prune_unstructured(eager, ratio, scope, inplace=inplace)
    with utils.pruning.threshold.tuned(kernels_from=0):
        got = prune_unstructured(compiled, ratio, scope, inplace=inplace)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == expected[name] if inplace else torch.equal(got[name], expected[name])
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert same_bits(a, b), name


settings_both = dict(
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ratio=st.floats(0, 1),
    scope=st.sampled_from(["global", "local"]),
    inplace=st.booleans(),
    ties=st.booleans(),
    channels_last=st.booleans(),
)


@needs_loops
@settings(max_examples=40, deadline=None)
@given(**settings_both)
def test_the_compiled_path_prunes_exactly_like_the_eager_path(
    seed, dtype, ratio, scope, inplace, ties, channels_last
):
    assert_both_paths_agree(
        lambda: mixed_model(seed, dtype, ties, channels_last), ratio, scope, inplace
    )


@needs_loops
@settings(max_examples=12, deadline=None)
@given(**settings_both)
def test_both_paths_agree_on_models_with_a_sampled_bracket_and_many_blocks(
    seed, dtype, ratio, scope, inplace, ties, channels_last
):
    assert_both_paths_agree(
        lambda: big_model(seed, dtype, ties, channels_last), ratio, scope, inplace
    )


@needs_loops
def test_both_paths_agree_on_two_parameters_sharing_one_storage():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        with torch.no_grad():
            model[0].weight.copy_(torch.randint(-2, 3, (8, 8)) / 2)
        model[1].weight = nn.Parameter(model[0].weight.data)  # another Parameter, the same memory
        return model

    assert_both_paths_agree(make, 0.5, "global", inplace=True)


@needs_loops
def test_the_compiled_path_is_taken(kernels_everywhere):
    prune_unstructured(mixed_model(1, torch.float32, False, False), 0.5, inplace=True)
    assert kernels_everywhere, "kernels.band was not called"


@needs_loops
def test_a_large_model_takes_the_compiled_path_and_a_small_one_does_not(monkeypatch):
    calls = []
    band = kernels.band
    monkeypatch.setattr(kernels, "band", lambda *a, **k: calls.append(a) or band(*a, **k))
    prune_unstructured(nn.Linear(64, 64), 0.5, inplace=True)
    assert not calls
    prune_unstructured(nn.Linear(2048, 2048), 0.5, inplace=True)  # 4 M weights
    assert calls


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_and_masked_weights_stay_on_the_eager_path(kernels_everywhere, dtype):
    prune_unstructured(mixed_model(2, dtype, False, False), 0.5)
    assert not kernels_everywhere
    model = mixed_model(2, torch.float32, False, False)
    prune_unstructured(model, 0.3)
    assert kernels_everywhere
    kernels_everywhere.clear()
    prune_unstructured(model, 0.6)  # masks now: the scores are not plain magnitudes
    assert not kernels_everywhere


def fresh_load(monkeypatch, **env):
    """Forget the loaded library and load it again under ``env``."""
    monkeypatch.setattr(kernels, "_LOADED", {})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return kernels.available()


def test_switched_off_or_without_a_compiler_the_loops_say_why(monkeypatch, tmp_path):
    assert not fresh_load(monkeypatch, PRUNING_BOOK_NO_KERNELS="1")
    assert "PRUNING_BOOK_NO_KERNELS" in kernels.why_not()
    with pytest.raises(RuntimeError, match="not available"):
        kernels.band(np.ones(4, np.float32), 0.0, 2.0)
    monkeypatch.delenv("PRUNING_BOOK_NO_KERNELS")
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert not fresh_load(monkeypatch, PRUNING_BOOK_KERNEL_CACHE=str(tmp_path))
    assert "no C compiler" in kernels.why_not()


def test_a_broken_compiler_is_reported_and_nothing_half_built_is_left(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_compiler", lambda: ["false"])  # exits 1, writes nothing
    assert not fresh_load(monkeypatch, PRUNING_BOOK_KERNEL_CACHE=str(tmp_path))
    assert "failed" in kernels.why_not()
    assert not list(tmp_path.iterdir())


def test_a_cache_folder_others_can_write_to_is_refused(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert not fresh_load(monkeypatch, PRUNING_BOOK_KERNEL_CACHE=str(shared))
    assert "not this user's alone" in kernels.why_not() and not list(shared.iterdir())


@needs_loops
def test_the_library_is_built_once_into_its_cache_then_loaded(monkeypatch, tmp_path):
    assert fresh_load(monkeypatch, PRUNING_BOOK_KERNEL_CACHE=str(tmp_path))
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1 and kernels.why_not() is None
    monkeypatch.setattr(kernels, "_build", lambda *a: pytest.fail("built twice"))
    assert fresh_load(monkeypatch)


FORK_AND_THREADS = """
import numpy as np
import os, sys, threading
import torch
from torch import nn
import utils.pruning.threshold
from utils.pruning import kernels
from utils.pruning import prune_unstructured
utils.pruning.threshold.set_tuning(utils.pruning.threshold.Tuning(kernels_from=0))
torch.set_num_threads(1)
errors = []
def job():
    try:
        torch.manual_seed(1)
        prune_unstructured(nn.Linear(512, 512), 0.5, inplace=True)
    except Exception as e:
        errors.append(e)
job()  # in the main thread first
assert torch.get_num_threads() == 1, "the loops changed torch's thread count"
threads = [threading.Thread(target=job) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
pid = os.fork()
if pid == 0:  # like a DataLoader worker: the loops start their threads per call, so they run
    kernels.torch.get_num_threads = lambda: 4  # the loops' own threads, in the child
    x = np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32)
    ok = kernels._threads(x.size) == 4 and kernels.band(x, 0.1, 0.2)[0] == np.count_nonzero(
        np.abs(x) <= np.float32(0.1))
    ok = ok and kernels.zero_below(x, 0.5) == np.count_nonzero(np.abs(x) < 0.5) == (x == 0).sum()
    os._exit(0 if ok and not errors and kernels.available() else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@needs_loops
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_thread_count_concurrent_calls_and_a_forked_child_after_the_compiled_path_ran(tmp_path):
    script = tmp_path / "fork_and_threads.py"
    script.write_text(FORK_AND_THREADS)
    env = {**os.environ, "PYTHONPATH": str(Path(utils.pruning.threshold.__file__).parents[1])}
    run = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]


@needs_loops
@pytest.mark.parametrize("inplace", [True, False])
def test_a_small_layer_of_a_large_model_is_checked_for_nan_in_local_scope(inplace):
    for bad_layer, bad in ((0, float("nan")), (1, float("inf"))):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(256, 256))  # 4,096 and 65,536
        with torch.no_grad():
            model[bad_layer].weight[3, 3] = bad
        before = [p.detach().clone() for p in model.parameters()]
        with utils.pruning.threshold.tuned(kernels_from=10_000):  # compiled: the large one only
            with pytest.raises(ValueError, match=f"layer '{bad_layer}' has NaN or infinite"):
                prune_unstructured(model, 0.5, "local", inplace=inplace)
        after = [p.detach() for p in model.parameters()]
        assert all(torch.equal(p.nan_to_num(), b.nan_to_num()) for p, b in zip(after, before))


def test_read_only_arrays_are_not_written_into():
    x = np.ones(8, np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.zero_below(x, 2.0)
    with pytest.raises(ValueError, match="writable"):
        kernels.keep_flags(np.ones(8, np.float32), 0.5, x)


def test_a_band_crowded_into_one_threads_range_is_gathered_exactly(monkeypatch):
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: 4)
    x = np.full(1 << 18, 5.0, np.float32)
    x[: 1 << 16] = np.linspace(0.1, 0.9, 1 << 16, dtype=np.float32)  # all in the first quarter
    below, positions, found = kernels.band(x, 0.0, 1.0)
    assert below == 0 and np.array_equal(positions, np.arange(1 << 16))
    assert np.array_equal(found, x[: 1 << 16])


def test_without_the_loops_the_eager_path_gives_the_same_result(monkeypatch):
    a, b = mixed_model(3, torch.float32, True, False), mixed_model(3, torch.float32, True, False)
    with utils.pruning.threshold.tuned(kernels_from=0):
        prune_unstructured(a, 0.6, inplace=True)
        assert not fresh_load(monkeypatch, PRUNING_BOOK_NO_KERNELS="1")
        prune_unstructured(b, 0.6, inplace=True)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@needs_loops
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("scope, ratio", [("global", 0.5), ("local", 0.5), ("global", 0.0)])
def test_nan_weights_are_refused_before_the_compiled_path_changes_anything(
    kernels_everywhere, bad, scope, ratio
):
    model = mixed_model(4, torch.float32, False, False)
    with torch.no_grad():
        model[3].weight[0, 0] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '3' has NaN or infinite"):
        prune_unstructured(model, ratio, scope, inplace=True)
    assert kernels_everywhere or ratio == 0
    assert all(
        torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in model.state_dict().items()
    )
