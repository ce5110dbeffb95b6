"""Automatic checks for the exercises: run the reader's function on fixed small inputs.

Each ``check_*`` prints one line per case and returns a :class:`Verdict`: true when every
case passes (so a cell can ``assert`` it), shown as a one-line summary in a notebook. Expected
answers come from :mod:`utils` or from plain tensor operations inside the check, never from
typed-in numbers. Three rules make the checks hard to fool:

- a function that returns ``None`` or raises never passes a case (no case expects ``None``);
- while the reader's function runs, the ``utils`` functions that the exercise asks the reader
  to write are blocked for the reader's code (calling them raises and fails the case; the
  library itself is not changed, see :func:`forbidden`);
- design and experiment exercises are judged by measuring the reader's result (sparsity, MACs,
  bytes, accuracy on a held-out set) against a stated tolerance.

A FAIL line says in words what was expected and what came back.
"""

from __future__ import annotations

import contextlib
import copy
import dis
import math
import numbers
import re
import reprlib
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from utils import pruning
from utils.lab import energy, measure
from utils.pruning import smallest_k, surgery

Judge = Callable[[Any], "str | None"]


# ----------------------------------------------------------------------------- machinery
FLOAT32_RTOL = 1e-6  # relative tolerance of a number: a few float32 roundings (eps 1.2e-7)


_SHORT = reprlib.Repr()  # bounded: a huge or deeply shared result must not cost minutes to show
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxother = 3, 8, 8, 8, 60


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    text = _SHORT.repr(x)
    return text if len(text) <= 80 else f"a {type(x).__name__} ({text[:60]}...)"


def _compare(got: Any, want: Any, atol: float) -> str | None:
    """``None`` when ``got`` matches ``want``; otherwise what is wrong, in words."""
    if isinstance(got, _Reason):
        return got.text
    if isinstance(got, Tensor) and got.dim() == 0 and isinstance(want, (int, float)):
        return (
            f"got a tensor holding {got.item()!r}; return a Python number "
            "(`.item()`, `int(...)` or `float(...)`)"
        )
    if got is None:
        if isinstance(want, float) and math.isinf(want):
            return "got None; expected math.inf, the answer for 'never' (return math.inf, not None)"
        return "got None: does your function `return` its result?"
    if callable(want) and not isinstance(want, (Tensor, type)):
        return want(got)
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor):
            return f"expected {_describe(want)}, got {_describe(got)}"
        if got.shape != want.shape:
            if want.dim() == 1 and got.dim() == 1:
                return f"expected {len(want)} values, got {len(got)}"
            return f"expected shape {tuple(want.shape)}, got shape {tuple(got.shape)}"
        if want.dtype == torch.bool:
            wrong = int((got.bool() != want).sum())
            return (
                None
                if wrong == 0
                else f"{wrong} of {want.numel()} entries differ from the expected mask"
            )
        if got.is_complex() or not torch.allclose(
            got.detach().double(), want.double(), atol=atol, rtol=FLOAT32_RTOL
        ):
            worst = (
                float((got.detach().double() - want.double()).abs().max())
                if not got.is_complex()
                else math.inf
            )
            shown = (
                f": expected {[round(v, 6) for v in want.tolist()]}"
                if want.dim() == 1 and len(want) <= 8
                else ""
            )
            return (
                f"values differ from the expected ones by up to {worst:.3g} (tolerance {atol:g} "
                f"+ {FLOAT32_RTOL:g} x |expected|){shown}"
            )
        return None
    if isinstance(want, float):
        if isinstance(got, bool) or not isinstance(got, numbers.Real):  # numpy scalars too
            return f"expected a number ({want:.6g}), got {_describe(got)}"
        got = float(got)
        if math.isinf(want):
            return None if got == want else f"expected {want} (math.inf), got {got!r}"
        # an honest answer computed in float32 (a tensor's .item()) is off by ~1e-7 relative
        tol = atol + FLOAT32_RTOL * abs(want)
        if abs(got - want) <= tol:
            return None
        return (
            f"expected {want:.6g}, got {got:.6g}: off by {abs(got - want):.2g}, more than the "
            f"tolerance {tol:.2g}"
        )
    if isinstance(want, int) and not isinstance(want, bool):
        if isinstance(got, bool) or not isinstance(got, numbers.Real) or got != want:
            return f"expected {want}, got {_describe(got)}"
        return None
    if type(got) is not type(want) or got != want:
        return f"expected {_describe(want)}, got {_describe(got)}"
    return None


class _Reason:
    """Returned by a check's wrapper in place of a result: fails the case with this text."""

    def __init__(self, text: str) -> None:
        self.text = text


def _unwrap(out: Any) -> Any:
    return _Reason(out) if isinstance(out, str) else out


def _blocker(f: Callable) -> Callable:
    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"this exercise asks you to write it yourself: calling the book's {f.__name__}() "
            "is not allowed here"
        )

    blocked.__name__ = f.__name__
    return blocked


class _BlockingModule(types.ModuleType):
    """A stand-in for one of the book's modules, seen only by the reader's code: attribute by
    attribute the module itself, except that the forbidden functions raise."""

    def __init__(self, module: types.ModuleType, banned: dict[int, Callable]) -> None:
        super().__init__(module.__name__)
        self.__dict__["_module"], self.__dict__["_banned"] = module, banned

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__dict__["_module"], name)
        return _shadow(value, self.__dict__["_banned"])


def _shadow(value: Any, banned: dict[int, Callable]) -> Any:
    """What the reader's code sees in place of ``value``."""
    if id(value) in banned:
        return banned[id(value)]
    if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "utils":
        return _BlockingModule(value, banned)
    return value


def _reader_functions(fn: Callable, banned: dict[int, Callable]) -> list[types.FunctionType]:
    """The reader's functions that ``fn`` reaches, and the book's wrappers on the way.

    Followed: a bound method's function, a ``functools.partial``'s, a decorated function
    (``__wrapped__``), a callable object's ``__call__``, and from each function the functions
    in its closure, its default arguments and the globals its code names. Raises if the reader
    handed in a forbidden function itself (directly or through a check's wrapper)."""
    found, todo, seen = [], [(fn, None)], set()
    while todo:
        f, parent = todo.pop()
        if id(f) in banned:
            if parent is None or _is_book(parent):
                banned[id(f)]()  # the book's own function, handed in as the answer: raises
            continue  # named by the reader's code: shadowed below
        if id(f) in seen or getattr(f, "runs_elsewhere", False):
            continue
        seen.add(id(f))
        inner = [getattr(f, a) for a in ("func", "__func__", "__wrapped__") if hasattr(f, a)]
        if not isinstance(f, types.FunctionType):
            calls = [k.__dict__["__call__"] for k in type(f).__mro__ if "__call__" in k.__dict__]
            inner += [c for c in calls[:1] if isinstance(c, types.FunctionType)]
            todo += [(g, parent) for g in inner]
            continue
        if _is_library(f) and not _is_book(f):
            continue
        found.append(f)
        todo += [(g, f) for g in inner]
        values = [c.cell_contents for c in (f.__closure__ or ()) if _filled(c)]
        values += list(f.__defaults__ or ()) + list((f.__kwdefaults__ or {}).values())
        if not _is_book(f):
            values += [f.__globals__[n] for n in _global_names(f.__code__) if n in f.__globals__]
        todo += [(v, f) for v in values if callable(v) and not isinstance(v, type)]
    return found


def _is_book(f: types.FunctionType) -> bool:
    return (f.__module__ or "").split(".")[0] == "utils"


def _is_library(f: types.FunctionType) -> bool:
    """Code of an installed package or of Python itself (never the reader's to shadow)."""
    module = sys.modules.get(f.__module__ or "")
    path = getattr(module, "__file__", None) or ""
    return (
        _is_book(f) or "site-packages" in path or path.startswith(sysconfig.get_paths()["stdlib"])
    )


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A code object and every code object nested in it (inner functions, lambdas)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _global_names(code: types.CodeType) -> set[str]:
    """The global names a code object (and the code nested in it) reads."""
    ops = ("LOAD_GLOBAL", "LOAD_NAME")
    return {i.argval for c in _codes(code) for i in dis.get_instructions(c) if i.opname in ops}


def _imports_a_banned_name(code: types.CodeType, banned_names: set[str]) -> str | None:
    """A forbidden function that the code imports itself: ``from utils... import name`` (any
    alias), or ``import utils...`` and then ``.name`` as an attribute."""
    for c in _codes(code):
        instructions = list(dis.get_instructions(c))
        for i in instructions:
            if i.opname == "IMPORT_FROM" and i.argval in banned_names:
                return i.argval
        if any(
            i.opname == "IMPORT_NAME" and str(i.argval).startswith("utils") for i in instructions
        ):
            for i in instructions:
                if i.opname in ("LOAD_ATTR", "LOAD_METHOD") and i.argval in banned_names:
                    return i.argval
    return None


@contextlib.contextmanager
def forbidden(fn: Callable, *functions: Callable) -> Iterator[None]:
    """While active, the reader's ``fn`` cannot call ``functions``: the exercise asks the reader
    to write that function, so the check must not pass by calling it.

    Only the reader's code is touched: in the global namespaces, closures and default arguments
    of the reader's functions (not the book's, not an installed package's), every name bound to
    a forbidden function is bound to one that raises, and every name bound to a module of
    ``utils`` to a
    stand-in whose forbidden attributes raise. Code that imports a forbidden function itself
    (``from utils.pruning import smallest_k as sk`` inside the function) is refused before it
    runs. Everything is restored afterwards. This guards against mistakes and casual shortcuts
    in the reader's own notebook, not against deliberate tampering (reading ``sys.modules``,
    for one): the grader runs each submission in a fresh kernel for that reason.
    """
    banned = {id(f): _blocker(f) for f in functions}
    readers = [f for f in _reader_functions(fn, banned) if not _is_book(f)]
    banned_names = {f.__name__ for f in functions}
    for f in readers:
        name = _imports_a_banned_name(f.__code__, banned_names)
        if name is not None:
            raise RuntimeError(
                f"this exercise asks you to write it yourself: importing the book's {name}() "
                "is not allowed here"
            )
    spaces, cells, touched, defaults = [], [], [], []
    for f in readers:
        if not any(f.__globals__ is g for g, _ in spaces):
            spaces.append((f.__globals__, {}))
        cells += [c for c in (f.__closure__ or ()) if _filled(c) and all(c is not d for d in cells)]
    try:
        for space, saved in spaces:
            for name, value in list(space.items()):
                shadow = _shadow(value, banned)
                if shadow is not value:
                    saved[name] = value
                    space[name] = shadow
        for cell in cells:  # names the reader's function closes over
            touched.append((cell, cell.cell_contents))
            cell.cell_contents = _shadow(cell.cell_contents, banned)
        for f in readers:  # default arguments
            defaults.append((f, f.__defaults__, f.__kwdefaults__))
            if f.__defaults__:
                f.__defaults__ = tuple(_shadow(v, banned) for v in f.__defaults__)
            if f.__kwdefaults__:
                f.__kwdefaults__ = {k: _shadow(v, banned) for k, v in f.__kwdefaults__.items()}
        yield
    finally:
        for space, saved in spaces:
            space.update(saved)
        for cell, value in reversed(touched):
            cell.cell_contents = value
        for f, positional, keyword in defaults:
            f.__defaults__, f.__kwdefaults__ = positional, keyword


# ----------------------------------------------------------------------------- grading
_FORBIDDEN: tuple[Callable, ...] = ()
_HIDDEN_SEED: int | None = None


def forbidden_now() -> tuple[Callable, ...]:
    """The library functions the running check forbids (the grader blocks them in its sandbox)."""
    return _FORBIDDEN


@contextlib.contextmanager
def hidden_cases(seed: int | None) -> Iterator[None]:
    """While active (``seed`` not None), the checks add cases drawn from ``seed`` to their public
    ones: other shapes, values, ties and empty rows, so that an answer typed in for the public
    cases fails. The grader turns this on; a notebook never does."""
    global _HIDDEN_SEED
    saved, _HIDDEN_SEED = _HIDDEN_SEED, seed
    try:
        yield
    finally:
        _HIDDEN_SEED = saved


def _drawn(salt: int) -> torch.Generator | None:
    """A generator for one check's hidden cases, or None outside grading."""
    if _HIDDEN_SEED is None:
        return None
    return torch.Generator().manual_seed((_HIDDEN_SEED * 1_000_003 + salt) % 2**63)


def _hidden_ints(salt: int, low: int, high: int, n: int, rows: int = 2) -> list[tuple[int, ...]]:
    """``rows`` tuples of ``n`` integers in [low, high] for hidden cases (none outside grading)."""
    g = _drawn(salt)
    if g is None:
        return []
    return [
        tuple(int(v) for v in torch.randint(low, high + 1, (n,), generator=g)) for _ in range(rows)
    ]


HIDDEN = "hidden case"


def _redacted(why: str) -> str:
    """A hidden case's FAIL text without the expected answer (what went wrong stays)."""
    why = re.sub(r":\s*expected \[[^\]]*\]", "", why)
    why = re.sub(
        r"expected (about )?-?[\d.]+(e-?\d+)?( \(within [^)]*\))?", "expected another value", why
    )
    return re.sub(r"off by [\d.e-]+", "off", why)


class Verdict:
    """The result of a check: true when every case passed; its repr is a one-line summary."""

    def __init__(self, passed: int, total: int) -> None:
        self.passed, self.total = passed, total

    def __bool__(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def __repr__(self) -> str:
        if self:
            return f"all {self.total} cases pass"
        return f"{self.passed} of {self.total} cases pass: fix the FAIL lines above"


def run_check(
    title: str,
    fn: Callable[..., Any],
    cases: Sequence[tuple[str, tuple, Any]],
    atol: float = 1e-6,
    forbid: Sequence[Callable] = (),
) -> Verdict:
    """Call ``fn(*args)`` for each ``(label, args, expected)`` and print pass/FAIL per case.

    ``expected`` is a value, or a function ``judge(got) -> None | str`` (``None`` = pass, a string
    says what is wrong). Numbers and float tensors pass within ``atol + FLOAT32_RTOL *
    |expected|`` (an honest float32 computation passes), masks and whole numbers only exactly.
    ``forbid`` lists library functions the reader must not call.
    """
    global _FORBIDDEN
    print(f"check: {title}")
    passed = 0
    elsewhere = getattr(fn, "runs_elsewhere", False)  # the grader's sandboxed function
    for label, args, want in cases:
        saved, _FORBIDDEN = _FORBIDDEN, tuple(forbid)
        try:
            with contextlib.nullcontext() if elsewhere else forbidden(fn, *forbid):
                got = fn(*args)
            why = _compare(got, want, atol)
        except Exception as e:  # the reader's code may raise anything; report it, do not crash
            why = f"your function raised {type(e).__name__}: {str(e)[:200]}"
        finally:
            _FORBIDDEN = saved
        passed += why is None
        if why is not None and label.startswith(HIDDEN):
            why = _redacted(why)
        print(
            f"  {'pass' if why is None else 'FAIL'}: {label}" + ("" if why is None else f" ({why})")
        )
    return Verdict(passed, len(cases))


def _tensors() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "random 4x6": torch.randn(4, 6, generator=g),
        "ties 3x4": torch.tensor(
            [[1.0, -1.0, 2.0, 0.0], [0.0, 1.0, -2.0, 1.0], [3.0, 0.0, 1.0, -1.0]]
        ),
        "conv 3x2x3x3": torch.randn(3, 2, 3, 3, generator=g),
    }
    h = _drawn(1)
    if h is not None:  # other shapes; values on a coarse grid (ties) and a row of zeros
        rows, cols = (int(v) for v in torch.randint(3, 9, (2,), generator=h))
        w = torch.randint(-4, 5, (rows, cols), generator=h).float() / 2
        w[int(torch.randint(0, rows, (1,), generator=h))] = 0
        out[f"{HIDDEN} {rows}x{cols} with ties"] = w
        shape = tuple(int(v) for v in torch.randint(2, 5, (4,), generator=h))
        out[f"{HIDDEN} conv {'x'.join(map(str, shape))}"] = torch.randn(shape, generator=h)
    return out


# ----------------------------------------------------------------------------- a toy task
# Design and experiment exercises train small models; MNIST would make a check take minutes.
# The toy task: 10 Gaussian features, 4 classes given by a random linear teacher; an MLP
# 10-64-64-4 reaches about 95 % in a second.
_TOY_CACHE: dict[int, tuple] = {}


def toy_task(seed: int = 0) -> tuple[torch.utils.data.DataLoader, tuple[Tensor, Tensor]]:
    """``(train_loader, (x_val, y_val))`` of the toy task (1,000 training, 500 validation points)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1500, 10, generator=g)
    y = (x @ torch.randn(10, 4, generator=g)).argmax(1)
    loader = DataLoader(
        TensorDataset(x[:1000], y[:1000]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, (x[1000:], y[1000:])


def toy_model() -> nn.Sequential:
    """The toy task's MLP: Linear 10-64, ReLU, Linear 64-64, ReLU, Linear 64-4."""
    return nn.Sequential(
        nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def toy_accuracy(model: nn.Module, val: tuple[Tensor, Tensor]) -> float:
    """Accuracy of ``model`` on the validation points (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return float((model(val[0]).argmax(1) == val[1]).float().mean())


def _trained_toy(seed: int = 0) -> tuple[nn.Module, torch.utils.data.DataLoader, tuple, float]:
    """A dense toy model trained for 10 epochs (cached), its loader, validation set and accuracy."""
    from utils.lab.training import train

    if seed not in _TOY_CACHE:
        loader, val = toy_task(seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = toy_model()
        train(model, loader, epochs=10, lr=0.05, progress=False)
        torch.random.set_rng_state(state)
        _TOY_CACHE[seed] = (model, loader, val, toy_accuracy(model, val))
    model, _, val, acc = _TOY_CACHE[seed]
    return (
        copy.deepcopy(model),
        toy_task(seed)[0],
        val,
        acc,
    )  # a fresh loader: the same shuffles every time


def _linear_sparsity(model: nn.Module) -> float:
    """Share of zeros among the weights of the Linear layers, masks included (plain tensor ops)."""
    ws = [pruning.effective_weight(m) for m in model.modules() if isinstance(m, nn.Linear)]
    return float(sum(int((w == 0).sum()) for w in ws)) / sum(w.numel() for w in ws)


def _as_model(got: Any) -> nn.Module | str:
    if not isinstance(got, nn.Module):
        return f"expected your function to return the model (an nn.Module), got {_describe(got)}"
    return got


# ----------------------------------------------------------------------------- chapter 1
def _embedding_model() -> nn.Module:
    """Token embeddings (a 2-D weight that is not a Conv2d or Linear weight), then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 8, 10), nn.LayerNorm(10)
    )


def check_count_weights(fn: Callable[[nn.Module], int]) -> Verdict:
    """``fn(model) -> number of weights in its Conv2d and Linear layers`` (biases excluded; the
    weights of Embedding, BatchNorm and LayerNorm layers are not counted)."""
    from utils.lab.models import VGG, LeNet5, LeNet300100

    models = {
        "LeNet5": LeNet5(),
        "LeNet300100": LeNet300100(),
        "VGG(width=0.25), with BatchNorm": VGG(width=0.25),
        "embedding + Linear + LayerNorm": _embedding_model(),
    }
    cases = []
    for name, model in models.items():
        want = sum(
            m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        )
        cases.append((name, (model,), want))
    return run_check(
        "weights of Conv2d and Linear layers",
        fn,
        cases,
        forbid=(measure.count_weights, measure.count_params),
    )


def check_model_megabytes(fn: Callable[[int, int], float]) -> Verdict:
    """``fn(n_params, bits) -> size in megabytes (10**6 bytes)`` of the raw values."""
    cases = [
        (f"{n:,} params at {b} bits", (n, b), n * b / 8 / 1e6)
        for n, b in [(61_706, 32), (25_557_032, 32), (25_557_032, 8), (1_000_000, 4)]
    ]
    cases += [
        (f"{HIDDEN}: {n:,} params at {b} bits", (n, b), n * b / 8 / 1e6)
        for n, b in [(n, (4, 8, 16, 32)[b % 4]) for n, b in _hidden_ints(2, 1, 10**8, 2)]
    ]
    return run_check("model size in MB", fn, cases)


def check_conv_macs(fn: Callable[[int, int, int, int, int], int]) -> Verdict:
    """``fn(c_in, c_out, k, h_out, w_out) -> multiply-accumulates`` of a k x k Conv2d (groups=1)."""
    cases = []
    hidden = [(a, b, (1, 3, 5)[k % 3], h, w) for a, b, k, h, w in _hidden_ints(3, 1, 24, 5)]
    for i, (c_in, c_out, k, h, w) in enumerate(
        [(1, 6, 5, 28, 28), (6, 16, 5, 10, 10), (64, 128, 3, 16, 16), (3, 8, 1, 7, 9), *hidden]
    ):
        conv = nn.Conv2d(c_in, c_out, k, bias=False)
        want = measure.count_flops(conv, torch.zeros(1, c_in, h + k - 1, w + k - 1)) // 2
        name = f"conv {c_in}->{c_out}, {k}x{k}, out {h}x{w}"
        cases.append((f"{HIDDEN}: {name}" if i >= 4 else name, (c_in, c_out, k, h, w), want))
    return run_check(
        "MACs of a convolution", fn, cases, forbid=(measure.count_flops, measure.layer_macs)
    )


def mlp_params(h1: int, h2: int, n_in: int = 784, n_out: int = 10) -> int:
    """Weights and biases of the MLP n_in-h1-h2-n_out (plain arithmetic)."""
    return (n_in + 1) * h1 + (h1 + 1) * h2 + (h2 + 1) * n_out


def check_mlp_widths(fn: Callable[[float, int], tuple[int, int]]) -> Verdict:
    """Design: ``fn(budget_mb, bits) -> (h1, h2)``, the hidden widths of an MLP 784-h1-h2-10 whose
    weights and biases, stored with ``bits`` bits each, take at most ``budget_mb`` MB (10**6 bytes)
    and at least 90 % of it, with h1 >= h2 >= 10."""

    def judge(budget: float, bits: int) -> Judge:
        def verdict(got: Any) -> str | None:
            if not (
                isinstance(got, (tuple, list))
                and len(got) == 2
                and all(isinstance(h, int) for h in got)
            ):
                return f"expected two ints (h1, h2), got {_describe(got)}"
            h1, h2 = got
            if not h1 >= h2 >= 10:
                return f"expected h1 >= h2 >= 10, got h1={h1}, h2={h2}"
            size = mlp_params(h1, h2) * bits / 8 / 1e6
            if not 0.9 * budget <= size <= budget:
                return f"784-{h1}-{h2}-10 takes {size:.4g} MB at {bits} bits; it must take {0.9 * budget:.4g} to {budget:g} MB"
            return None

        return verdict

    cases = [
        (f"{b:g} MB at {bits} bits", (b, bits), judge(b, bits))
        for b, bits in [(1.0, 32), (0.05, 8), (0.25, 4), (2.0, 8)]
    ]
    return run_check("an MLP that fits a memory budget", fn, cases)


# ----------------------------------------------------------------------------- chapter 2
def check_sparsity(fn: Callable[[Tensor], float]) -> Verdict:
    """``fn(tensor) -> fraction of zero entries`` as a float in [0, 1]."""
    cases = [
        (name, (w.clone(),), float((w == 0).sum()) / w.numel()) for name, w in _tensors().items()
    ]
    cases.append(("all zeros", (torch.zeros(5, 5),), 1.0))
    cases.append(("int tensor, half zeros", (torch.tensor([0, 3, 0, 7]),), 0.5))
    tiny = torch.tensor([1e-8, -1e-30, 0.0, -0.0, 2.0])  # tiny is not zero; -0.0 is
    cases.append(("tiny non-zero values and -0.0", (tiny,), 0.4))
    cases.append(("float16", (torch.tensor([0.0, 1e-4, 0.0, 3.0], dtype=torch.float16),), 0.5))
    return run_check("sparsity of a tensor", fn, cases)


def check_local_counts(fn: Callable[[Sequence[int], float], list[int]]) -> Verdict:
    """``fn(layer_sizes, ratio) -> weights pruned in each layer`` under local pruning, each
    rounded to the nearest integer with Python's ``round``."""
    cases = [
        (f"sizes {s}, ratio {r}", (list(s), r), [round(r * n) for n in s])
        for s, r in [((150, 2400, 48000), 0.5), ((10, 10), 0.25), ((7, 3, 1), 0.9), ((100,), 0.1)]
    ]
    cases += [
        (
            f"{HIDDEN}: sizes {list(s[:3])}, ratio {s[3] / 20}",
            (list(s[:3]), s[3] / 20),
            [round(s[3] / 20 * n) for n in s[:3]],
        )
        for s in _hidden_ints(4, 1, 19, 4)
    ]
    return run_check("weights pruned per layer (local)", fn, cases)


def check_theoretical_speedup(fn: Callable[[Sequence[int], Sequence[float]], float]) -> Verdict:
    """``fn(macs_per_layer, density_per_layer) -> dense MACs / MACs left`` when zeros are skipped."""
    cases = [
        (f"macs {m}, density {d}", (list(m), list(d)), sum(m) / sum(a * b for a, b in zip(m, d)))
        for m, d in [
            ((100, 100), (0.5, 0.5)),
            ((117600, 240000, 48000), (1.0, 0.2, 0.05)),
            ((10,), (0.1,)),
        ]
    ]
    for m in _hidden_ints(5, 10, 5000, 3):
        d = [round(0.05 + 0.3 * i, 2) for i in range(3)]
        cases.append(
            (f"{HIDDEN}: macs {list(m)}", (list(m), d), sum(m) / sum(a * b for a, b in zip(m, d)))
        )
    return run_check("theoretical speedup", fn, cases, atol=1e-9, forbid=(measure.effective_macs,))


def best_speedup(
    sizes: Sequence[int], macs: Sequence[int], total: float, cap: float = 0.95
) -> float:
    """The largest theoretical speedup at overall weight sparsity ``total`` with each layer at most
    ``cap`` sparse: prune the layers with the most MACs per weight first (a fractional knapsack)."""
    left = total * sum(sizes)
    kept_macs = float(sum(macs))
    for n, m in sorted(zip(sizes, macs), key=lambda nm: -nm[1] / nm[0]):
        take = min(cap * n, left)
        kept_macs -= m * take / n
        left -= take
    return sum(macs) / kept_macs


def check_sparsity_allocation(fn: Callable[[list[int], list[int], float], list[float]]) -> Verdict:
    """Design: ``fn(sizes, macs, total) -> per-layer sparsities`` (each in [0, 0.95]) whose overall
    weight sparsity is ``total`` (within 0.005) and whose theoretical speedup is at least 95 % of
    the best one possible under these rules."""
    from utils.lab.models import VGG, LeNet5

    cases = []
    for name, model, example in [
        ("LeNet-5", LeNet5(), torch.zeros(1, 1, 32, 32)),
        ("VGG(width=0.25), 32x32 input", VGG(width=0.25), torch.zeros(1, 3, 32, 32)),
    ]:
        macs_by_layer = measure.layer_macs(model, example)
        modules = dict(model.named_modules())
        sizes = [modules[k].weight.numel() for k in macs_by_layer]
        macs = list(macs_by_layer.values())
        for total in (0.5, 0.8):
            best = best_speedup(sizes, macs, total)

            def judge(got: Any, sizes=sizes, macs=macs, total=total, best=best) -> str | None:
                if not isinstance(got, (list, tuple)) or len(got) != len(sizes):
                    return f"expected a list of {len(sizes)} sparsities, got {_describe(got)}"
                s = [float(v) for v in got]
                if min(s) < 0 or max(s) > 0.95 + 1e-9:
                    return f"every sparsity must lie in [0, 0.95], got {[round(v, 3) for v in s]}"
                overall = sum(n * v for n, v in zip(sizes, s)) / sum(sizes)
                if abs(overall - total) > 0.005:
                    return f"overall sparsity is {overall:.4f}, expected {total} (within 0.005)"
                speedup = sum(macs) / sum(m * (1 - v) for m, v in zip(macs, s))
                if speedup < 0.95 * best:
                    return f"theoretical speedup {speedup:.2f}x; the best allocation reaches {best:.2f}x (need 95 % of it)"
                return None

            cases.append(
                (f"{name}, total sparsity {total}", (list(sizes), list(macs), total), judge)
            )
    return run_check(
        "per-layer sparsities for the largest speedup", fn, cases, forbid=(measure.effective_macs,)
    )


# ----------------------------------------------------------------------------- chapter 3
def check_rowwise_mask(fn: Callable[[Tensor, float], Tensor]) -> Verdict:
    """``fn(weight, ratio) -> bool mask`` (True = kept) that removes, in every output unit (row of a
    Linear, filter of a Conv2d), the ``round(ratio * weights_per_unit)`` smallest magnitudes, ties
    to the earliest position."""
    cases = []
    for name, w in _tensors().items():
        for r in (0.0, 0.25, 0.5, 0.9):
            rows = w.reshape(w.shape[0], -1).abs()
            k = round(r * rows.shape[1])
            want = torch.stack([~smallest_k(row, k) for row in rows]).view_as(w)
            cases.append((f"{name}, ratio {r}", (w.clone(), r), want))
    return run_check(
        "row-wise magnitude mask",
        fn,
        cases,
        forbid=(
            smallest_k,
            pruning.prune_unstructured,
            pruning.prune_structured,
            pruning.semi_structured_mask,  # an n:m mask with m = the row length is this one
        ),
    )


def check_share_at_threshold(fn: Callable[[Tensor, float], float]) -> Verdict:
    """``fn(weight, theta) -> share of the weights that equation 3.1 prunes at threshold theta``:
    the fraction of entries with ``|w| <= theta``, as a float."""
    cases = []
    for name, w in _tensors().items():
        for theta in (0.0, 0.5, 1.0):
            cases.append(
                (
                    f"{name}, theta {theta}",
                    (w.clone(), theta),
                    float((w.abs() <= theta).sum()) / w.numel(),
                )
            )
    return run_check(
        "share pruned at a threshold", fn, cases, forbid=(smallest_k, pruning.prune_unstructured)
    )


def _sparse_toy_model(got: Any, ratio: float, val: tuple) -> tuple[str | None, float, float]:
    """(what is wrong or None, Linear sparsity, validation accuracy) of a returned toy model that
    must be ``ratio`` sparse within 0.005."""
    got = _as_model(got)
    if isinstance(got, str):
        return got, math.nan, math.nan
    with torch.random.fork_rng():  # the reference layout, without touching the reader's RNG
        reference = toy_model()

    def layout(model: nn.Module) -> list[tuple]:  # masks (parametrizations) looked through
        from torch.nn.utils import parametrize

        out = []
        for name, m in model.named_modules():
            if ".parametrizations" in f".{name}" or name.endswith("parametrizations"):
                continue
            kind = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
            shapes = tuple(
                tuple(getattr(m, t).shape) if isinstance(getattr(m, t, None), Tensor) else None
                for t in ("weight", "bias")
            )
            out.append((name, kind.__name__, shapes))
        return out

    if layout(got) != layout(reference):
        return (
            "the returned model's layers differ from the toy MLP's (Linear 10-64, ReLU, Linear "
            "64-64, ReLU, Linear 64-4): prune by zeroing weights, keep the layers",
            math.nan,
            math.nan,
        )
    s = _linear_sparsity(got)
    if abs(s - ratio) > 0.005:
        return (
            f"the Linear weights are {s:.3f} sparse; expected {ratio} (within 0.005)",
            s,
            math.nan,
        )
    return None, s, toy_accuracy(got, val)


def _check_pruned_toy(
    title: str,
    fn: Callable,
    ratios: Sequence[float],
    trained: bool,
    floor: float,
    extra: Callable[[float], tuple],
) -> Verdict:
    """Shared judge: the model ``fn`` returns must be ``ratio`` sparse (within 0.005) over its
    Linear weights and within ``floor`` of the dense validation accuracy."""
    cases = []
    for ratio in ratios:
        model, loader, val, dense = _trained_toy(0)
        if not trained:
            torch.manual_seed(1)
            model = toy_model()

        def judge(got: Any, ratio=ratio, val=val, dense=dense) -> str | None:
            problem, _, acc = _sparse_toy_model(got, ratio, val)
            if problem:
                return problem
            if acc < dense - floor:
                return (
                    f"validation accuracy {acc:.1%}; it must stay within {floor * 100:g} percentage "
                    f"points of the dense model's {dense:.1%}"
                )
            return None

        cases.append((f"sparsity {ratio}", (model, loader) + extra(ratio), judge))
    return run_check(title, fn, cases)


def check_prune_finetune(fn: Callable[[nn.Module, Any, float], nn.Module]) -> Verdict:
    """Experiment: ``fn(model, train_loader, ratio) -> model``. ``model`` is a trained MLP of the toy
    task; prune ``ratio`` of its Linear weights by magnitude and fine-tune it so that validation
    accuracy stays within 3 points of the dense model (sparsity exact within 0.005)."""
    return _check_pruned_toy("train, prune, fine-tune", fn, (0.9, 0.95), True, 0.03, lambda r: (r,))


# ----------------------------------------------------------------------------- chapter 4.1
def check_global_threshold(fn: Callable[[list[Tensor], float], float]) -> Verdict:
    """``fn(weights, ratio) -> theta``: the k-th smallest |w| over all tensors, k = round(ratio * n)
    (k >= 1), so that pruning ``|w| <= theta`` removes k weights when there are no ties."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for sizes, r in [((5, 7), 0.5), ((100, 3, 40), 0.9), ((1000,), 0.123), ((4, 4), 0.01)]:
        ws = [torch.randn(n, generator=g) for n in sizes]
        flat = torch.cat(ws).abs()
        k = max(1, round(r * flat.numel()))
        cases.append(
            (
                f"sizes {sizes}, ratio {r}",
                ([w.clone() for w in ws], r),
                float(flat.kthvalue(k).values),
            )
        )
    return run_check("global threshold", fn, cases, forbid=(smallest_k, pruning.prune_unstructured))


def check_geometric_schedule(fn: Callable[[float, int], list[float]]) -> Verdict:
    """``fn(final_sparsity, rounds) -> sparsity after each round`` when every round removes the same
    share of the weights still left: s_i = 1 - (1 - S) ** (i / rounds)."""

    def as_list(*args: Any) -> Any:
        out = fn(*args)
        return (
            torch.tensor([float(v) for v in out], dtype=torch.float64) if out is not None else None
        )

    cases = [
        (
            f"S={s}, {n} rounds",
            (s, n),
            torch.tensor([1 - (1 - s) ** (i / n) for i in range(1, n + 1)], dtype=torch.float64),
        )
        for s, n in [(0.9, 3), (0.92, 5), (0.5, 1)]
    ]
    return run_check("iterative pruning schedule", as_list, cases, atol=1e-9)


def check_regrown(fn: Callable[[Tensor, Tensor], int]) -> Verdict:
    """``fn(weight, mask) -> how many pruned positions (mask == 0) hold a non-zero weight``."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for shape in [(4, 5), (3, 2, 3, 3), (6, 6)]:
        w = torch.randn(shape, generator=g)
        w[torch.rand(shape, generator=g) < 0.3] = 0
        mask = (torch.rand(shape, generator=g) < 0.5).float()
        cases.append(
            (f"shape {shape}", (w.clone(), mask.clone()), int(((mask == 0) & (w != 0)).sum()))
        )
    return run_check("regrown weights", fn, cases)


def check_safe_ratio(fn: Callable[[nn.Module, tuple[Tensor, Tensor], float], float]) -> Verdict:
    """Experiment: ``fn(model, val, budget) -> ratio``: the largest global pruning ratio among
    0.05, 0.10, ..., 0.95 at which the toy MLP ``model``, pruned without fine-tuning, keeps a
    validation accuracy (on ``val = (x, y)``) of at least dense - budget. Within one step of the
    check's own scan."""
    model, _, val, dense = _trained_toy(0)
    cases = []
    for budget in (0.01, 0.05):
        best = 0.0
        for i in range(1, 20):
            m = copy.deepcopy(model)
            pruning.prune_unstructured(m, i / 20)
            if toy_accuracy(m, val) >= dense - budget:
                best = i / 20

        def judge(got: Any, best=best) -> str | None:
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                return f"expected a ratio (a float), got {_describe(got)}"
            return (
                None
                if abs(got - best) <= 0.05 + 1e-9
                else f"expected about {best:.2f} (within 0.05), got {got:.3f}"
            )

        cases.append((f"accuracy budget {budget}", (copy.deepcopy(model), val, budget), judge))
    return run_check("largest safe global ratio", fn, cases)


# ----------------------------------------------------------------------------- chapter 4.2
def check_dead_units(fn: Callable[[Tensor], int]) -> Verdict:
    """``fn(weight) -> number of output units (rows / filters) whose weights are all zero``."""
    cases = []
    for name, w in _tensors().items():
        w = w.clone()
        w[0] = 0
        cases.append((name, (w,), int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum())))
    cases.append(
        ("zero columns, one zero row", (torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.0]]),), 1)
    )
    return run_check("whole units removed", fn, cases)


def check_flatten_columns(fn: Callable[[Tensor, int], Tensor]) -> Verdict:
    """``fn(kept_channels, hw) -> the input columns of the Linear after flatten that stay``
    (channel c owns columns c*hw ... c*hw + hw - 1), in increasing order."""
    cases = []
    for keep, hw in [([0, 2], 3), ([1], 25), ([0, 3, 4], 1)]:
        k = torch.tensor(keep)
        cases.append(
            (
                f"channels {keep}, h*w={hw}",
                (k.clone(), hw),
                (k[:, None] * hw + torch.arange(hw)).reshape(-1),
            )
        )

    def as_long(*args: Any) -> Any:
        out = fn(*args)
        return torch.as_tensor(out).long() if out is not None else None

    return run_check("columns of the next layer", as_long, cases)


def check_shrink_linear_pair(fn: Callable[[nn.Linear, nn.Linear, Tensor], tuple]) -> Verdict:
    """``fn(fc1, fc2, keep) -> (small_fc1, small_fc2)``: fc1 keeps only the units ``keep``, fc2 only
    the matching inputs; ``fc2(relu(fc1(x)))`` is unchanged when the other units were dead."""
    torch.manual_seed(3)
    cases = []
    for n_in, n_hidden, n_out, keep in [(6, 5, 3, [0, 3]), (10, 8, 4, [1, 2, 7])]:
        fc1, fc2 = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_out)
        dead = [i for i in range(n_hidden) if i not in keep]
        with torch.no_grad():
            fc1.weight[dead] = 0
            fc1.bias[dead] = 0
        x = torch.randn(5, n_in)
        want = fc2(torch.relu(fc1(x))).detach()

        def run(fc1=fc1, fc2=fc2, keep=keep, x=x) -> Any:
            out = fn(fc1, fc2, torch.tensor(keep))
            if out is None:
                return None
            if not (
                isinstance(out, tuple)
                and len(out) == 2
                and all(isinstance(m, nn.Linear) for m in out)
            ):
                return f"expected two nn.Linear layers, got {_describe(out)}"
            small1, small2 = out
            if small1.out_features != len(keep):
                return f"small_fc1 has {small1.out_features} units, expected {len(keep)}"
            return small2(torch.relu(small1(x))).detach()

        cases.append((f"{n_hidden} units, keep {keep}", (run,), want))
    return run_check(
        "shrink a Linear pair",
        lambda run: _unwrap(run()),
        cases,
        atol=1e-5,
        forbid=(surgery.shrink,),
    )


def check_macs_budget(fn: Callable[[nn.Module, Any, int], nn.Module]) -> Verdict:
    """Design: ``fn(model, train_loader, budget) -> smaller model``: remove whole hidden units of the
    trained toy MLP (and fine-tune) so that its Linear layers do between 80 % and 100 % of
    ``budget`` MACs per input, with validation accuracy within 2 points of the dense model."""
    cases = []
    for budget in (2500, 1500):
        model, loader, val, dense = _trained_toy(0)

        def judge(got: Any, budget=budget, val=val, dense=dense) -> str | None:
            got = _as_model(got)
            if isinstance(got, str):
                return got
            macs = sum(measure.layer_macs(got, val[0][:1]).values())
            if not 0.8 * budget <= macs <= budget:
                return f"the model does {macs} MACs per input; expected {int(0.8 * budget)} to {budget}"
            acc = toy_accuracy(got, val)
            if acc < dense - 0.02:
                return f"validation accuracy {acc:.1%}; it must stay within 2 points of the dense {dense:.1%}"
            return None

        dense_macs = sum(measure.layer_macs(model, val[0][:1]).values())
        cases.append(
            (f"budget {budget} MACs (dense: {dense_macs})", (model, loader, budget), judge)
        )
    return run_check("a smaller MLP under a MACs budget", fn, cases)


# ----------------------------------------------------------------------------- chapter 5
def check_csr_bytes(fn: Callable[[int, int, int], int]) -> Verdict:
    """``fn(rows, cols, nnz) -> bytes`` of a float32 CSR matrix with int64 indices, as PyTorch stores
    it: a value and a column index per non-zero, and rows + 1 row pointers."""
    cases = []
    hidden = [(r, c, (r * c * z) // 30) for r, c, z in _hidden_ints(6, 2, 30, 3)]
    for rows, cols, nnz in [
        (3, 4, 2),
        (120, 400, 4800),
        (4096, 4096, 167772),
        (10, 10, 0),
        *hidden,
    ]:
        w = torch.zeros(rows * cols)
        w[:nnz] = 1.0
        name = f"{rows}x{cols}, {nnz} non-zeros"
        name = f"{HIDDEN}: {name}" if len(cases) >= 4 else name  # after the 4 public cases
        cases.append((name, (rows, cols, nnz), measure.csr_bytes(w.view(rows, cols))))
    return run_check("bytes of a CSR matrix", fn, cases, forbid=(measure.csr_bytes, measure.to_csr))


def check_break_even(fn: Callable[[dict[float, float]], float]) -> Verdict:
    """``fn({sparsity: csr_time / dense_time}) -> the lowest sparsity at which CSR was faster``
    (ratio below 1), or ``math.inf`` when CSR was never faster."""
    tables = [
        ("wins from 0.9", {0.5: 3.1, 0.9: 0.8, 0.95: 0.4, 0.99: 0.1}),
        ("never wins", {0.5: 3.0, 0.99: 1.2}),
        ("unordered keys", {0.99: 0.2, 0.8: 0.9, 0.7: 1.5}),
        ("noisy: wins, loses, wins", {0.7: 0.95, 0.8: 1.05, 0.9: 0.7}),
        ("exactly as fast is not faster", {0.6: 1.0, 0.95: 0.5}),
    ]
    cases = [
        (label, (dict(t),), float(min((s for s, r in t.items() if r < 1), default=math.inf)))
        for label, t in tables
    ]
    return run_check("break-even sparsity", fn, cases)


def check_modelled_energy(fn: Callable[[float, float, bool], float]) -> Verdict:
    """``fn(macs, weights, on_chip) -> µJ`` per inference under the 45 nm model of ``utils.lab.energy``:
    a float multiply and add per MAC, one 32-bit read per weight from DRAM, or on chip from an
    SRAM just large enough for the weights (``energy.sram_read_pj``)."""
    cases = [
        (
            f"{m:g} MACs, {w:g} weights, on_chip={c}",
            (m, w, c),
            energy.modelled_energy(m, w, on_chip=c)["total µJ"],
        )
        for m, w, c in [
            (416_520, 61_470, True),
            (416_520, 61_470, False),
            (100_000, 5_000, True),
            (1.3e8, 9.2e6, False),
            (0, 10, True),
        ]
    ]
    return run_check("modelled energy", fn, cases, atol=1e-6, forbid=(energy.modelled_energy,))


def check_csr_storage_break_even(fn: Callable[[int, int], float]) -> Verdict:
    """Experiment: ``fn(rows, cols) -> density`` at which a float32 CSR matrix (int64 indices) takes
    as many bytes as the dense matrix. Checked against the bytes PyTorch really stores: 0.02 below
    your density CSR must be smaller than dense, 0.02 above it larger."""

    def bytes_at(rows: int, cols: int, density: float) -> int:
        w = torch.zeros(rows * cols)
        w[: int(round(density * rows * cols))] = 1.0
        return measure.csr_bytes(w.view(rows, cols))

    def judge(rows: int, cols: int) -> Judge:
        def verdict(got: Any) -> str | None:
            if (
                isinstance(got, bool)
                or not isinstance(got, (int, float))
                or not 0.02 <= got <= 0.98
            ):
                return f"expected a density between 0.02 and 0.98, got {_describe(got)}"
            dense = rows * cols * 4
            below, above = bytes_at(rows, cols, got - 0.02), bytes_at(rows, cols, got + 0.02)
            if not below < dense < above:
                return (
                    f"PyTorch stores {below} bytes at density {got - 0.02:.3f} and {above} at "
                    f"{got + 0.02:.3f}; dense takes {dense}: the break-even is not at {got:.3f}"
                )
            return None

        return verdict

    cases = [
        (f"{r}x{c}", (r, c), judge(r, c)) for r, c in [(300, 784), (64, 64), (3, 8), (1000, 10)]
    ]
    return run_check(
        "CSR storage break-even, measured", fn, cases, forbid=(measure.csr_bytes, measure.to_csr)
    )


# ----------------------------------------------------------------------------- chapter 6
def check_relative_amount(fn: Callable[[float, float], float]) -> Verdict:
    """``fn(current, target) -> amount`` for ``torch.nn.utils.prune``, whose amount counts among the
    weights still unpruned, so that a tensor ``current`` sparse becomes ``target`` sparse."""
    cases = [
        (f"{c} -> {t}", (c, t), (t - c) / (1 - c))
        for c, t in [(0.0, 0.5), (0.5, 0.75), (0.9, 0.95), (0.3, 0.3)]
    ]
    cases += [
        (
            f"{HIDDEN}: {a / 100} -> {(a + b) / 100}",
            (a / 100, (a + b) / 100),
            (b / 100) / (1 - a / 100),
        )
        for a, b in _hidden_ints(7, 0, 45, 2)
    ]
    return run_check("relative amount", fn, cases, atol=1e-9)


def check_pruned_tensor_names(fn: Callable[[nn.Module], list[str]]) -> Verdict:
    """``fn(module) -> sorted names of its own tensors reparametrized by torch.nn.utils.prune``."""
    from torch.nn.utils import prune

    def build(kind: str) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Linear(4, 3)
        if kind in ("weight", "both"):
            prune.l1_unstructured(m, "weight", amount=0.5)
        if kind in ("bias", "both"):
            prune.random_unstructured(m, "bias", amount=0.3)
        return m

    def nested() -> nn.Module:
        outer = nn.Sequential(nn.Linear(2, 2))
        prune.l1_unstructured(outer[0], "weight", amount=0.5)
        return outer

    cases = [
        (f"{k} pruned", (build(k),), w)
        for k, w in [
            ("none", []),
            ("weight", ["weight"]),
            ("bias", ["bias"]),
            ("both", ["bias", "weight"]),
        ]
    ]
    cases.append(("only a child is pruned", (nested(),), []))
    return run_check("names of pruned tensors", fn, cases)


def check_semi_structured_mask(fn: Callable[[Tensor], Tensor]) -> Verdict:
    """``fn(weight) -> bool mask`` keeping the 2 largest magnitudes of every 4 consecutive inputs."""
    g = torch.Generator().manual_seed(4)
    cases = [
        (name, (w,), pruning.semi_structured_mask(w))
        for name, w in [
            ("random 3x8", torch.randn(3, 8, generator=g)),
            ("ties 1x8", torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.0]])),
            ("random 16x16", torch.randn(16, 16, generator=g)),
        ]
    ]
    return run_check("2:4 mask", fn, cases, forbid=(pruning.semi_structured_mask,))


def check_halve_macs(fn: Callable[[nn.Module, Tensor], nn.Module]) -> Verdict:
    """Experiment: ``fn(resnet18, example) -> pruned model`` that does between 45 % and 55 % of the
    dense model's MACs on ``example`` (a 1x3x64x64 batch), keeps every convolution (no layer
    removed) and still outputs 1,000 logits. Torch-Pruning's ``pruning_ratio`` acts on channels."""
    import torchvision

    def case(seed: int) -> tuple:
        torch.manual_seed(seed)
        model = torchvision.models.resnet18().eval()
        example = torch.randn(1, 3, 64, 64)
        dense = measure.count_flops(model, example)
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())

        def judge(got: Any) -> str | None:
            got = _as_model(got)
            if isinstance(got, str):
                return got
            got.eval()
            if sum(isinstance(m, nn.Conv2d) for m in got.modules()) != convs:
                return f"expected all {convs} convolutions to remain"
            with torch.no_grad():
                shape = tuple(got(example).shape)
            if shape != (1, 1000):
                return f"expected output shape (1, 1000), got {shape}"
            share = measure.count_flops(got, example) / dense
            return (
                None
                if 0.45 <= share <= 0.55
                else f"the model does {share:.1%} of the dense MACs; expected 45 % to 55 %"
            )

        return (f"ResNet-18, seed {seed}", (model, example), judge)

    return run_check("ResNet-18 at half the MACs", fn, [case(0)])


# ----------------------------------------------------------------------------- chapter 7
def check_mask_overlap(fn: Callable[[Tensor, Tensor], float]) -> Verdict:
    """``fn(mask_a, mask_b) -> overlap`` of two keep-masks (1 = kept): weights kept by both divided
    by weights kept by either (the Jaccard index); 1.0 when both keep nothing."""
    g = torch.Generator().manual_seed(6)
    pairs = {
        "random 8x8": (
            (torch.rand(8, 8, generator=g) < 0.3),
            (torch.rand(8, 8, generator=g) < 0.5),
        ),
        "identical": (torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 1, 1])),
        "disjoint, float masks": (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])),
        "both empty": (torch.zeros(3), torch.zeros(3)),
    }
    h = _drawn(9)
    if h is not None:
        n = int(torch.randint(5, 40, (1,), generator=h))
        pairs[f"{HIDDEN}: random {n}"] = (
            torch.rand(n, generator=h) < 0.4,
            (torch.rand(n, generator=h) < 0.6).float(),
        )
        pairs[f"{HIDDEN}: both empty, {n}"] = (torch.zeros(n, dtype=torch.bool), torch.zeros(n))
    cases = []
    for name, (a, b) in pairs.items():
        a_, b_ = a.bool(), b.bool()
        either = int((a_ | b_).sum())
        cases.append(
            (name, (a.clone(), b.clone()), float((a_ & b_).sum()) / either if either else 1.0)
        )
    return run_check("overlap of two masks", fn, cases)


def check_total_sparsity(fn: Callable[[dict[str, int], dict[str, float]], float]) -> Verdict:
    """``fn(sizes, ratios) -> overall sparsity`` when layer ``name`` (``sizes[name]`` weights) is
    pruned at ``ratios[name]``; layers missing from ``ratios`` stay dense."""
    tables = [
        (
            "LeNet-300-100-like",
            {"fc1": 235200, "fc2": 30000, "fc3": 1000},
            {"fc1": 0.95, "fc2": 0.9, "fc3": 0.5},
        ),
        (
            "one layer left dense",
            {"conv1": 150, "conv2": 2400, "fc1": 48000},
            {"conv2": 0.5, "fc1": 0.9},
        ),
        ("equal sizes", {"a": 10, "b": 10}, {"a": 0.2, "b": 0.6}),
        ("counts that are not whole (exact, not rounded)", {"a": 3, "b": 7}, {"a": 0.5, "b": 0.5}),
    ]
    for i, row in enumerate(_hidden_ints(8, 1, 999, 4)):
        sizes = {f"layer{j}": n for j, n in enumerate(row[:3])}
        tables.append((f"{HIDDEN} {i + 1}", sizes, {"layer0": row[3] / 1000, "layer2": 0.5}))
    cases = [
        (
            label,
            (dict(sizes), dict(ratios)),
            sum(n * ratios.get(k, 0.0) for k, n in sizes.items()) / sum(sizes.values()),
        )
        for label, sizes, ratios in tables
    ]
    return run_check("overall sparsity of per-layer ratios", fn, cases, atol=1e-9)


class _EpochWatch:
    """A loader that records the model's Linear sparsity each time a pass over it (an epoch) starts."""

    def __init__(self, loader: Any, model: nn.Module):
        self.loader, self.model, self.starts = loader, model, []

    def __iter__(self):
        self.starts.append(_linear_sparsity(self.model))
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "model", "starts"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def grader_state(self) -> dict:
        """What the grader brings back from its sandbox: the sparsity at each epoch's start."""
        return {"starts": [float(v) for v in self.starts]}

    def grader_restore(self, state: dict) -> None:
        self.starts = [float(v) for v in state["starts"]]


def check_gradual_pruning(fn: Callable[[nn.Module, Any, float, int], nn.Module]) -> Verdict:
    """Experiment: ``fn(model, train_loader, final, epochs) -> model``. ``model`` is an *untrained*
    toy MLP; train it for ``epochs`` epochs while raising its sparsity to ``final`` (prune during
    training, e.g. on a cubic schedule). The result must be ``final`` sparse (within 0.005) over its
    Linear weights, with validation accuracy within 3 points of a dense model trained as long, and
    the ramp must end before the last pass over ``train_loader`` starts (no weight is pruned in the
    last epoch), so that at least the last epoch trains the pruned network. The method is checked
    too (pruning once and fine-tuning is not pruning while training): from one epoch's start to
    the next the recorded sparsity may rise by at most 0.9 x ``final``, and at least one epoch
    must start between 0.01 and ``final`` - 0.01. The record is kept by the loader the function
    is given, so this guards against a wrong method, not against a forged record."""
    final, epochs = 0.95, 10
    _, loader, val, dense = _trained_toy(0)
    torch.manual_seed(1)
    model = toy_model()
    watched = _EpochWatch(loader, model)

    def judge(got: Any) -> str | None:
        problem, s, acc = _sparse_toy_model(got, final, val)
        if problem:
            return problem
        if not watched.starts:
            return "train the model on train_loader (no pass over it started)"
        if len(watched.starts) != epochs:
            return f"train for exactly {epochs} epochs: {len(watched.starts)} passes over train_loader started"
        seen = [0.0, *watched.starts]  # the untrained model starts dense
        jump = max(b - a for a, b in zip(seen, seen[1:]))
        between = [v for v in watched.starts if 0.01 < v < final - 0.01]
        if jump > 0.9 * final or not between:  # one-shot pruning, then fine-tuning
            return (
                f"the sparsity at the epochs' starts was {[round(v, 3) for v in watched.starts]}: "
                f"it rose by {jump:.3f} from one epoch's start to the next; raise it over at least "
                f"two epochs (no rise above {0.9 * final:.3f}, at least one epoch starting "
                f"between 0.01 and {final - 0.01:.2f}), for example a cubic ramp over 4-8 "
                "epochs that ends before the last one"
            )
        if (
            s - watched.starts[-1] > 1e-4
        ):  # more than a rounding step: weights were pruned in the last epoch
            return (
                f"the sparsity rose from {watched.starts[-1]:.4f} to {s:.4f} after the last epoch started: "
                "end the ramp earlier, so that the last epoch(s) train the pruned network"
            )
        if acc < dense - 0.03:
            return (
                f"validation accuracy {acc:.1%}; it must stay within 3 percentage points of the dense "
                f"model's {dense:.1%}"
            )
        return None

    return run_check(
        "prune while training", fn, [(f"sparsity {final}", (model, watched, final, epochs), judge)]
    )


# ----------------------------------------------------------------------------- chapter 8
def check_int8(fn: Callable[[Tensor], tuple[Tensor, float]]) -> Verdict:
    """``fn(w) -> (q, scale)``: symmetric per-tensor int8 quantization, scale = max|w| / 127,
    q = round(w / scale) (round half to even, as ``torch.round``) as torch.int8."""
    g = torch.Generator().manual_seed(5)
    ws = {
        "random 4x5": torch.randn(4, 5, generator=g),
        "with zeros": torch.tensor([0.0, -1.0, 0.5, 0.25]),
        "tiny": torch.randn(3, 3, generator=g) * 1e-3,
    }
    cases = []
    for name, w in ws.items():
        scale = float(w.abs().max()) / 127
        cases.append((name, (w.clone(),), torch.round(w / scale).clamp(-127, 127).to(torch.int8)))

    def q_only(w: Tensor) -> Any:
        out = fn(w)
        if out is None:
            return None
        if not (isinstance(out, tuple) and len(out) == 2):
            return _Reason(f"expected a pair (q, scale), got {_describe(out)}")
        q, scale = out
        if abs(float(scale) - float(w.abs().max()) / 127) > 1e-9:
            return _Reason(
                f"scale should be max|w| / 127 = {float(w.abs().max()) / 127:.4g}, got {float(scale):.4g}"
            )
        return (
            q
            if q.dtype == torch.int8
            else _Reason(f"q should have dtype torch.int8, got {q.dtype}")
        )

    return run_check("int8 quantization", q_only, cases)


def check_combined_compression(fn: Callable[[float, int], float]) -> Verdict:
    """``fn(sparsity, bits) -> compression vs dense fp32`` when the kept weights are stored with
    ``bits`` bits (index storage ignored): 32 / bits / (1 - sparsity)."""
    cases = [
        (f"sparsity {s}, {b} bits", (s, b), 32 / b / (1 - s))
        for s, b in [(0.0, 8), (0.9, 32), (0.9, 8), (0.5, 4)]
    ]
    return run_check("pruning and quantization together", fn, cases, atol=1e-9)


def check_best_config(fn: Callable[[list[dict], float, float], str]) -> Verdict:
    """``fn(rows, min_accuracy, max_latency) -> name`` of the row with the fewest parameters among those
    with accuracy >= min_accuracy and latency <= max_latency, or the string ``"none"`` if no row
    qualifies. Rows have keys name, accuracy, latency, params."""
    rows = [
        {"name": "dense", "accuracy": 0.98, "latency": 10.0, "params": 60000},
        {"name": "unstructured global", "accuracy": 0.975, "latency": 10.5, "params": 6000},
        {"name": "structured local", "accuracy": 0.96, "latency": 4.0, "params": 15000},
        {"name": "structured global", "accuracy": 0.97, "latency": 5.0, "params": 14000},
    ]

    def want(a: float, t: float) -> str:
        ok = [r for r in rows if r["accuracy"] >= a and r["latency"] <= t]
        return min(ok, key=lambda r: r["params"])["name"] if ok else "none"

    cases = [
        (label, ([dict(r) for r in rows], a, t), want(a, t))
        for label, a, t in [
            ("accuracy first", 0.97, 20.0),
            ("latency first", 0.95, 6.0),
            ("nothing qualifies", 0.965, 4.5),
            ("everything allowed", 0.0, 100.0),
            ("limits are inclusive", 0.96, 4.0),
        ]
    ]
    return run_check("decision guide", fn, cases)


def check_compression_budget(fn: Callable[[nn.Module, Any], tuple[nn.Module, int]]) -> Verdict:
    """Design: ``fn(model, train_loader) -> (model, bits)``: prune (and fine-tune) the trained toy MLP
    and choose a bit width so that its Linear weights, kept ones stored with ``bits`` bits (indices
    ignored), are at least 20x smaller than dense fp32, and accuracy after the check quantizes every
    kept weight to ``bits`` bits (symmetric, per tensor) stays within 2 points of the dense model."""
    model, loader, val, dense = _trained_toy(0)

    def judge(got: Any) -> str | None:
        if not (
            isinstance(got, tuple)
            and len(got) == 2
            and isinstance(got[0], nn.Module)
            and isinstance(got[1], int)
            and 2 <= got[1] <= 32
        ):
            return f"expected (model, bits) with bits an int from 2 to 32, got {_describe(got)}"
        m, bits = got
        ratio = 32 / bits / max(1e-12, 1 - _linear_sparsity(m))
        if ratio < 20:
            return f"{ratio:.1f}x smaller than dense fp32; expected at least 20x"
        q = pruning.make_permanent(pruning.clone_model(m))
        with torch.no_grad():
            for layer in q.modules():
                if isinstance(layer, nn.Linear):
                    w = layer.weight
                    scale = w.abs().max() / (2 ** (bits - 1) - 1)
                    if scale > 0:
                        w.copy_(torch.round(w / scale) * scale)
        acc = toy_accuracy(q, val)
        if acc < dense - 0.02:
            return f"accuracy after {bits}-bit quantization {acc:.1%}; it must stay within 2 points of the dense {dense:.1%}"
        return None

    return run_check(
        "20x smaller: pruning and quantization", fn, [("toy MLP", (model, loader), judge)]
    )


def check_distillation_loss(fn: Callable[[Tensor, Tensor, Tensor, float, float], Any]) -> Verdict:
    """``fn(student, teacher, labels, temperature, alpha) -> loss`` (a scalar tensor or number):
    Hinton et al.'s distillation loss, ``alpha * T**2 * KL(p_teacher || p_student)`` on the
    softened distributions (batch mean) plus ``(1 - alpha)`` times cross-entropy with the labels."""
    from utils.lab import training

    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    settings = [
        ("T=4, alpha=0.9", s, t, 4.0, 0.9),
        ("T=1, alpha=0.5", s, t, 1.0, 0.5),
        ("T=2, alpha=0: cross-entropy only", s, t, 2.0, 0.0),
        ("T=8, alpha=1: the teacher only", s, t, 8.0, 1.0),
        ("T=4, alpha=1, student equals teacher", t, t, 4.0, 1.0),
    ]

    def number(args: tuple) -> Any:
        student = args[0].clone().requires_grad_()
        out = fn(student, *args[1:])
        if isinstance(out, Tensor) and out.numel() == 1:
            if out.grad_fn is None:
                return _Reason("the loss must keep its gradient: return the tensor, not .item()")
            return float(out.detach())
        return out

    cases = [
        (
            label,
            (a.clone(), b.clone(), y.clone(), temp, alpha),
            float(training.distillation_loss(a, b, y, temp, alpha)),
        )
        for label, a, b, temp, alpha in settings
    ]
    return run_check(
        "distillation loss",
        lambda *args: number(args),
        cases,
        atol=1e-5,
        forbid=(training.distillation_loss,),
    )


def check_fold_batchnorm(fn: Callable[[nn.Conv2d, nn.BatchNorm2d], nn.Conv2d]) -> Verdict:
    """``fn(conv, bn) -> conv2``: one Conv2d (same shape and hyper-parameters) whose output equals
    ``bn(conv(x))`` in eval mode, with or without a bias in ``conv``; ``conv`` and ``bn`` unchanged."""
    from torch.nn.utils import fusion

    from utils.lab import deploy

    def pair(seed: int, bias: bool, groups: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        torch.manual_seed(seed)
        conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=bias, groups=groups).eval()
        bn = nn.BatchNorm2d(6).eval()
        with torch.no_grad():  # statistics and scales that a trained network has
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.001, 0.01)  # small enough that eps (1e-5) matters
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        return conv, bn

    def case(seed: int, bias: bool, groups: int, stride: int) -> tuple:
        conv, bn = pair(seed, bias, groups, stride)
        x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = bn(conv(x))
        before = [t.clone() for t in (*conv.state_dict().values(), *bn.state_dict().values())]

        def judge(got: Any) -> str | None:
            if not isinstance(got, nn.Conv2d):
                return f"expected an nn.Conv2d, got {_describe(got)}"
            after = [*conv.state_dict().values(), *bn.state_dict().values()]
            if any(not torch.equal(a, b) for a, b in zip(before, after)):
                return "conv or bn was changed: build a new Conv2d (or a copy)"
            if got.bias is None:
                return "the folded convolution needs a bias (beta - gamma * mean / sigma)"
            with torch.no_grad():
                out = got.eval()(x)
            if out.shape != want.shape:
                return f"output shape {tuple(out.shape)}, expected {tuple(want.shape)}"
            worst = float((out - want).abs().max()) / (1 + float(want.abs().max()))
            return (
                None
                if worst <= 2e-5
                else f"outputs differ from bn(conv(x)) by up to {worst:.2g} of their size "
                "(tolerance 2e-5; did you use the running statistics and bn.eps?)"
            )

        return (f"bias={bias}, groups={groups}, stride={stride}", (conv, bn), judge)

    cases = [case(0, True, 1, 1), case(1, False, 1, 2), case(2, True, 2, 1)]
    return run_check(
        "BatchNorm folded into the convolution",
        fn,
        cases,
        forbid=(fusion.fuse_conv_bn_eval, fusion.fuse_conv_bn_weights, deploy.fold_batchnorm),
    )


def check_prune_for_runtime(fn: Callable[[nn.Module, Tensor], nn.Module]) -> Verdict:
    """Design: ``fn(resnet20, example) -> model`` pruned with Torch-Pruning (or by hand) so that its
    first stage stays whole (the stem and the first stage's convolutions keep their 32 channels),
    it does between 35 % and 45 % of the dense MACs on ``example`` (1x1x32x32), every convolution
    keeps a multiple of 16 output channels (the float32 SIMD width of AVX-512), none is removed,
    and it still outputs 10 logits per image."""
    from utils.lab import zoo

    def case(seed: int) -> tuple:
        model = zoo.fresh("resnet20", seed).eval()
        example = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
        dense = measure.count_flops(model, example)
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())

        def judge(got: Any) -> str | None:
            if not isinstance(got, nn.Module):
                return f"expected the pruned model, got {_describe(got)}"
            layers = [m for m in got.modules() if isinstance(m, nn.Conv2d)]
            if len(layers) != convs:
                return f"{len(layers)} convolutions, expected all {convs} kept"
            odd = sorted({m.out_channels for m in layers if m.out_channels % 16})
            if odd:
                return f"convolutions with {odd} output channels: not multiples of 16"
            first = [got.conv1, *(m for m in got.layer1.modules() if isinstance(m, nn.Conv2d))]
            if any(m.out_channels != 32 for m in first):
                return "the first stage was pruned: the stem and layer1 must keep 32 channels"
            with torch.no_grad():
                got.eval()
                try:
                    out = got(torch.randn(3, 1, 32, 32))
                except Exception as e:
                    return f"the pruned model fails on a batch of 3: {type(e).__name__}: {e}"
            if out.shape != (3, 10):
                return f"output shape {tuple(out.shape)}, expected (3, 10)"
            share = measure.count_flops(got, example) / dense
            if not 0.35 <= share <= 0.45:
                return f"it does {share:.0%} of the dense MACs; the budget is 35 % to 45 %"
            return None

        return (f"ResNet-20, seed {seed}", (model, example), judge)

    return run_check("pruned for the runtime", fn, [case(0), case(1)])
