"""CPU Linear layers run the fastest of equivalent products (node/runtime/linear.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from node.runtime import linear


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(linear, "_chosen", {})


def layer(out_features=48, in_features=32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return linear.tune(nn.Linear(in_features, out_features, bias=bias).requires_grad_(False))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(1, 32), (3, 1, 32), (2, 7, 32), (5, 130, 32)])
def test_either_product_is_the_linear_layer(shape, transposed, monkeypatch):
    tuned = layer()
    x = torch.randn(*shape)
    linear._chosen[(48, 32, torch.float32, linear.rows_class(x.numel() // 32))] = transposed
    out = tuned(x)
    assert out.shape == (*shape[:-1], 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, tuned.weight, tuned.bias), rtol=1e-5, atol=1e-6)


def test_the_choice_is_timed_once_per_shape_and_size_class_then_kept(monkeypatch):
    tuned = layer(bias=False)
    timed = []
    real = linear._choose
    monkeypatch.setattr(linear, "_choose", lambda *a: timed.append(a[0]) or real(*a))
    for rows in (3, 4, 5, 1, 12, 16):
        tuned(torch.randn(rows, 32))
    # classes 4 (3 to 5 rows), 1, 16 (12 and 16 rows): each timed on its first input only
    assert [key[-1] for key in timed] == [4, 1, 16]
    assert set(linear._chosen) == {(48, 32, torch.float32, c) for c in (1, 4, 16)}
    x = torch.randn(3, 32)
    assert torch.equal(tuned(x), tuned(x))  # the same way every time: reproducible results


def test_a_size_class_is_the_nearest_power_of_two():
    """A rebuild of 512 tokens and a step (513 rows) is served by the choice its 512-row prefill timed."""
    assert [linear.rows_class(r) for r in (1, 2, 3, 5, 6, 11, 12, 362, 363, 512, 513, 724, 725)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        256,
        512,
        512,
        512,
        512,
        1024,
    ]
    assert linear.rows_class(1 << 20) == linear.MAX_ROWS_CLASS


def test_gradients_flow_through_either_product():
    tuned = layer()
    for transposed in (False, True):
        linear._chosen[(48, 32, torch.float32, 8)] = transposed
        x = torch.randn(2, 4, 32, requires_grad=True)
        (grad,) = torch.autograd.grad(tuned(x).sum(), x)
        torch.testing.assert_close(grad, tuned.weight.sum(0).expand(2, 4, 32), rtol=1e-5, atol=1e-6)


def test_only_plain_cpu_linears_are_tuned_and_state_dicts_are_unchanged():
    class Custom(nn.Linear):
        pass

    block = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.LayerNorm(4))
    names = list(block.state_dict())
    linear.tune(block)
    assert type(block[0]) is linear.TunedLinear and isinstance(block[0], nn.Linear)
    assert type(block[1]) is Custom and type(block[2]) is nn.LayerNorm
    assert list(block.state_dict()) == names


def test_other_dtypes_than_the_weights_go_to_f_linear_untimed():
    tuned = layer()
    x = torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # as nn.Linear: the caller casts first (Block.forward does)
        tuned(x)
    assert linear._chosen == {}


def test_choices_are_kept_in_a_file_for_a_replacement_runtime(tmp_path, monkeypatch):
    path = tmp_path / "linear_choices.json"
    monkeypatch.setattr(linear, "_file", None)
    assert linear.remember(str(path)) == 0  # nothing kept yet
    layer(bias=False)(torch.randn(7, 32))
    layer(bias=False)(torch.randn(1, 32))
    chosen = dict(linear._chosen)
    assert set(chosen) == {(48, 32, torch.float32, 8), (48, 32, torch.float32, 1)}

    monkeypatch.setattr(linear, "_chosen", {})  # a new runtime process
    assert linear.remember(str(path)) == 2 and linear._chosen == chosen
    timed = []
    monkeypatch.setattr(linear, "_choose", lambda *a: timed.append(a[0]))
    layer(bias=False)(torch.randn(6, 32))
    assert timed == []  # served at once with the kept choice

    path.write_text("{not json")
    monkeypatch.setattr(linear, "_chosen", {})
    assert linear.remember(str(path)) == 0 and linear._chosen == {}  # a damaged file: timed again


def test_each_layer_keeps_its_choices_by_rows_and_copies_start_empty():
    """A decode step looks its choice up in the layer itself; a layer copied with type(layer)(...) (a
    tensor-parallel shard) starts with no choices of its own, and an input either way cannot take
    (another dtype) is not remembered."""
    tuned = layer(bias=False)
    linear._chosen[(48, 32, torch.float32, 8)] = True
    tuned(torch.randn(2, 3, 32))  # 6 rows: the class of 8
    tuned(torch.randn(1, 32))
    assert set(tuned.ways) == {6, 1} and tuned.ways[6] is True
    with pytest.raises(RuntimeError):
        tuned(torch.randn(5, 32, dtype=torch.float64))
    assert 5 not in tuned.ways
    copy = type(tuned)(32, 48, bias=False)
    assert copy.ways == {} and copy(torch.randn(6, 32)).shape == (6, 48)


def test_the_input_that_is_timed_gets_the_product_of_the_chosen_way(monkeypatch):
    """Choosing computed the product already: it is the answer (with the bias), from the untimed first
    run of each way; then each way is timed twice."""
    tuned = layer()
    products = []
    real = linear.product
    monkeypatch.setattr(linear, "product", lambda *a: products.append(a[2]) or real(*a))
    x = torch.randn(2, 5, 32)
    first = tuned(x)
    assert products == [linear.LINEAR, linear.TRANSPOSED] * 3
    assert first.shape == (2, 5, 48)
    torch.testing.assert_close(first, F.linear(x, tuned.weight, tuned.bias), rtol=1e-5, atol=1e-6)
    assert torch.equal(first, tuned(x))  # the same way as every later call: reproducible results


def test_a_cold_first_product_does_not_decide(monkeypatch):
    """The first product of a shape is slow whichever way it takes (a kernel's set-up, fresh memory): timed,
    it made the other way look faster (a large product, 64 rows of a 1024 x 4096 weight, was timed once
    each way). Each way runs once untimed first, so equal ways stay F.linear's. The clock is the test's
    own: how fast this machine's BLAS runs either way must not decide (on an AVX2 EPYC 64 rows may well be
    faster transposed)."""
    tuned = layer(1024, 4096, bias=False)
    real = linear.product
    now = [0.0]
    calls = []

    def product(*a):
        calls.append(a[2])
        now[0] += 0.05 if len(calls) == 1 else 0.01  # the first call cold, every later one alike
        return real(*a)

    monkeypatch.setattr(linear, "product", product)
    monkeypatch.setattr(linear, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    tuned(torch.randn(64, 4096))
    assert calls == [linear.LINEAR, linear.TRANSPOSED] * 3
    assert tuned.ways[64] == linear.LINEAR


def test_gradients_flow_through_the_input_that_was_timed():
    tuned = layer()
    x = torch.randn(2, 4, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(tuned(x).sum(), x)  # the first input of its size: timed, then answered
    torch.testing.assert_close(grad, tuned.weight.sum(0).expand(2, 4, 32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("way", [linear.LINEAR, linear.TRANSPOSED, linear.VECTOR])
def test_every_way_of_one_row_is_the_linear_layer(way, dtype):
    """One row (a decode step) may also go through torch.mv: the same product, with the bias."""
    tuned = layer().to(dtype)
    x = torch.randn(1, 1, 32, dtype=dtype)
    linear._chosen[(48, 32, dtype, 1)] = way
    out = tuned(x)
    assert out.shape == (1, 1, 48) and out.is_contiguous() and tuned.ways[1] == way
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, F.linear(x, tuned.weight, tuned.bias), **tol)


def test_the_vector_way_is_timed_for_one_row_only_and_never_kept_for_more(tmp_path, monkeypatch):
    tuned = layer()
    products = []
    real = linear.product
    monkeypatch.setattr(linear, "product", lambda *a: products.append(a[2]) or real(*a))
    tuned(torch.randn(1, 32))
    assert sorted(set(products)) == [linear.LINEAR, linear.TRANSPOSED, linear.VECTOR]
    products.clear()
    tuned(torch.randn(3, 32))
    assert sorted(set(products)) == [linear.LINEAR, linear.TRANSPOSED]
    # a kept file naming the vector way for more than one row is damaged: nothing of it is used
    path = tmp_path / "linear_choices.json"
    path.write_text('[[48, 32, "float32", 1, 2], [48, 32, "float32", 4, 2]]')
    monkeypatch.setattr(linear, "_chosen", {})
    assert linear.remember(str(path)) == 0 and linear._chosen == {}
    path.write_text('[[48, 32, "float32", 1, 2], [48, 32, "float32", 4, true]]')  # true: an older file's way
    assert linear.remember(str(path)) == 2
    assert linear._chosen == {(48, 32, torch.float32, 1): linear.VECTOR, (48, 32, torch.float32, 4): linear.TRANSPOSED}


def test_gradients_flow_through_the_vector_way():
    tuned = layer()
    linear._chosen[(48, 32, torch.float32, 1)] = linear.VECTOR
    x = torch.randn(1, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(tuned(x).sum(), x)
    torch.testing.assert_close(grad, tuned.weight.sum(0).expand(1, 32), rtol=1e-5, atol=1e-6)
