"""utils.lab.deploy and the distillation loss of utils.lab.training (chapter 5.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from utils.lab import deploy
from utils.lab.models import ResNet
from utils.lab.training import Distillation, distillation_loss, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet(blocks=1, widths=(8, 16, 16))
    with torch.no_grad():  # BatchNorm statistics a trained network has, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


# ----------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distillation_loss_is_the_written_formula(device, dtype):
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(6, 5, generator=g, dtype=dtype).to(device) * 2 for _ in range(2))
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    temp, alpha = 3.0, 0.7
    p, log_q = F.softmax(t / temp, 1), F.log_softmax(s / temp, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    want = alpha * temp**2 * kl + (1 - alpha) * F.cross_entropy(s, y)
    got = distillation_loss(s, t, y, temp, alpha)
    assert got.dtype == dtype and torch.allclose(got, want, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.5, 10), st.integers(1, 8), st.integers(2, 6), st.integers(0, 10_000))
def test_distillation_loss_invariants(temp, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    # alpha = 0 is cross-entropy; the soft part is zero for a student equal to its teacher, and
    # non-negative otherwise (a KL divergence); shifting logits by a constant changes nothing
    assert torch.allclose(distillation_loss(s, t, y, temp, 0.0), F.cross_entropy(s, y), atol=1e-6)
    assert abs(float(distillation_loss(t, t, y, temp, 1.0))) < 1e-5
    assert float(distillation_loss(s, t, y, temp, 1.0)) >= -1e-6
    shifted = distillation_loss(s + 3.0, t - 1.0, y, temp, 0.5)
    assert torch.allclose(shifted, distillation_loss(s, t, y, temp, 0.5), atol=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        (
            (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.0, 0.5),
            "temperature",
        ),
        (
            (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 2.0, 1.5),
            "alpha",
        ),
        (
            (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 2.0, 0.5),
            "batch, classes",
        ),
    ],
)
def test_distillation_loss_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(*args)
    with pytest.raises(ValueError):
        Distillation(nn.Linear(2, 2), temperature=-1.0)


def test_distillation_trains_the_student_towards_its_teacher():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval()
    student = nn.Linear(4, 3)
    x = torch.randn(64, 4)
    y = teacher(x).argmax(1).detach()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    frozen = [p.clone() for p in teacher.parameters()]

    def gap() -> float:
        with torch.no_grad():
            return float(
                F.kl_div(
                    F.log_softmax(student(x), 1),
                    F.log_softmax(teacher(x), 1),
                    reduction="batchmean",
                    log_target=True,
                )
            )

    before = gap()
    train(student, loader, epochs=20, lr=0.1, loss=Distillation(teacher, 2.0, 1.0), progress=False)
    assert gap() < 0.5 * before
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))  # teacher fixed


# ----------------------------------------------------------------------------- folding
@pytest.mark.parametrize("device", DEVICES)
def test_fold_batchnorm_keeps_outputs_and_removes_every_batchnorm(device):
    model = small_resnet().to(device)
    x = torch.randn(3, 1, 32, 32, device=device)
    folded = deploy.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is kept
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_fold_batchnorm_refuses_an_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Branchy().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="FX-traceable"):
        deploy.fold_batchnorm(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ----------------------------------------------------------------------------- ONNX Runtime
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_resnet()
    path = deploy.export_onnx(
        model, torch.randn(4, 1, 32, 32), tmp_path_factory.mktemp("onnx") / "m.onnx"
    )
    return model, path


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_onnx_runtime_gives_the_eager_outputs_at_any_batch(exported, batch):
    model, path = exported
    run = deploy.ort_runner(deploy.ort_session(path, threads=1))
    x = torch.randn(batch, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run(x), model(x), atol=1e-4)


def test_the_exported_graph_has_batchnorm_folded(exported):
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported[1])).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_ort_session_refuses_bad_threads_and_does_not_spin(exported):
    with pytest.raises(ValueError, match="threads"):
        deploy.ort_session(exported[1], threads=0)
    for spinning, entry in ((False, "0"), (True, "1")):
        session = deploy.ort_session(exported[1], threads=2, spinning=spinning)
        assert session.get_providers() == ["CPUExecutionProvider"]
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
        assert options.intra_op_num_threads == 2


def test_int8_model_agrees_with_the_float_model(exported, tmp_path):
    import onnx

    model, path = exported
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 1, 32, 32, generator=g) for _ in range(4)]
    q = deploy.quantize_int8(path, calibration, tmp_path / "q.onnx")
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = torch.randn(64, 1, 32, 32, generator=g)
    with torch.no_grad():
        want = model(x)
    got = deploy.ort_runner(deploy.ort_session(q, threads=1))(x)
    # int8 rounds: close, not equal (the logits move by a small share of their spread)
    assert float((got - want).abs().max()) < float(want.std())
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.9


# ----------------------------------------------------------------------------- timing helpers
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=50))
def test_spread_orders_its_quartiles(times):
    s = deploy.spread(times)
    assert s["q1 ms"] <= s["median ms"] <= s["q3 ms"]
    import statistics

    assert math.isclose(s["median ms"], 1e3 * statistics.median(times), rel_tol=1e-9)
    assert min(times) * 1e3 - 1e-9 <= s["q1 ms"] and s["q3 ms"] <= max(times) * 1e3 + 1e-9


def test_spread_needs_two_times():
    with pytest.raises(ValueError, match="two"):
        deploy.spread([0.1])


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = {
        "a": (1.0, 0.90),
        "b": (2.0, 0.95),
        "c": (2.5, 0.94),
        "d": (1.0, 0.90),
        "e": (3.0, 0.99),
    }
    assert deploy.pareto_front(points) == ["a", "d", "b", "e"]  # by cost, then name
    assert deploy.pareto_front({}) == []


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=3),
        st.tuples(st.floats(0, 10), st.floats(0, 1)),
        max_size=8,
    )
)
def test_pareto_front_properties(points):
    front = deploy.pareto_front(points)

    def dominates(p, q):
        return p[0] <= q[0] and p[1] >= q[1] and p != q

    for n in points:  # on the front exactly when no other point dominates it
        assert (n in front) == (not any(dominates(points[m], points[n]) for m in points))
    assert front == sorted(front, key=lambda n: (points[n][0], -points[n][1], n))


# ----------------------------------------------------------------------------- BatchNorm statistics
def test_recalibrate_batchnorm_measures_the_data_it_sees():
    from utils.lab.training import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    model[1].momentum = 0.3
    x = torch.randn(40, 3) * 2 + 5
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(40)), batch_size=10
    )
    out = recalibrate_batchnorm(model, loader, batches=4)
    with torch.no_grad():
        h = model[0](x)
    assert out is model and not model.training and model[1].momentum == 0.3
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-5)  # equal batches: the mean
    batch_vars = torch.stack([h[i : i + 10].var(0) for i in range(0, 40, 10)])
    assert torch.allclose(model[1].running_var, batch_vars.mean(0), atol=1e-4)


def test_recalibrate_batchnorm_uses_only_the_batches_asked_and_refuses_bad_input():
    from utils.lab.training import recalibrate_batchnorm

    model = nn.Sequential(nn.BatchNorm1d(2))
    x = torch.cat([torch.zeros(10, 2), torch.ones(10, 2) * 100])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(20)), batch_size=10
    )
    recalibrate_batchnorm(model, loader, batches=1)
    assert torch.equal(model[0].running_mean, torch.zeros(2))  # the second batch was not used
    with pytest.raises(ValueError, match="positive"):
        recalibrate_batchnorm(model, loader, batches=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(2, 2), loader)


def test_recalibrate_batchnorm_leaves_the_statistics_alone_when_a_batch_fails():
    from utils.lab.training import recalibrate_batchnorm

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)
    bad = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 5), torch.zeros(8)), batch_size=4
    )  # 5 features where the model takes 3
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, bad)
    assert torch.equal(model[1].running_mean, torch.full((2,), 7.0))
    assert model[1].momentum == 0.1 and not model.training
