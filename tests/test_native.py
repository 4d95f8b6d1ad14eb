"""The C kernels (`fusion.native`) against plain float64 computations and the torch paths they
replace, their limits, and their build."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fusion import native
from fusion.batch_layout import Table
from fusion.methods import mixlora_ffn
from fusion.methods.mixlora_ffn import LayerExperts, expert_mixture

needs_kernels = pytest.mark.skipif(not native.available(), reason="no C compiler here: the torch paths serve")


def random_table(g, din: int, outs: dict[str, tuple[int, int]]):
    """A Table whose members have (ranks, d_out) each, factors of magnitude ~1."""
    width = sum(r for r, _ in outs.values())
    A = torch.randn(width, din, generator=g) / din**0.5
    members, start = [], 0
    for name, (ranks, dout) in outs.items():
        members.append((name, start, start + ranks, torch.randn(ranks, dout, generator=g) / ranks**0.5))
        start += ranks
    return Table(A, members, width)


def plain(table: Table, x, ys: dict, scale) -> dict:
    """Table.apply in float64, written out."""
    h = (x.double() @ table.A.double().t()) * scale.double()
    return {name: ys[name].double() + h[:, s:e] @ Bt.double() for name, s, e, Bt in table.members}


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("beside", [True, False])
def test_table_kernel_equals_the_plain_products(rows, density, beside):
    g = torch.Generator().manual_seed(rows * 10 + int(density * 10))
    table = random_table(g, 37, {"q_proj": (12, 40), "k_proj": (12, 9), "v_proj": (5, 9)})
    x = torch.randn(rows, 37, generator=g)
    scales = torch.randn(rows, 40, generator=g)  # the table's per-rank scales are columns 2..31
    scales[:, 2:31] *= torch.rand(rows, 29, generator=g) < density
    ys = {name: torch.randn(rows, Bt.shape[1], generator=g) for name, _, _, Bt in table.members}
    want = plain(table, x, ys, scales[:, 2:31])
    assert table.start(x, scales, 2, beside)  # the kernel serves: rows <= MAX_ROWS, float32
    assert isinstance(table.kernel, native.NativeTable)
    table.finish(True, x, ys, scales, 2)
    for name in ys:
        assert ys[name].shape == want[name].shape
        torch.testing.assert_close(ys[name].double(), want[name], rtol=0, atol=2e-5)


@needs_kernels
def test_the_helper_thread_gives_the_calling_threads_result_bit_for_bit():
    """Products computed beside the caller (`native.helper`) equal those computed by the caller,
    bit for bit, and a call whose base projections failed leaves the table usable."""
    g = torch.Generator().manual_seed(5)
    table = random_table(g, 64, {"gate_proj": (16, 96), "up_proj": (16, 96)})
    x, scales = torch.randn(8, 64, generator=g), torch.randn(8, 32, generator=g)
    base = {name: torch.randn(8, 96, generator=g) for name in ("gate_proj", "up_proj")}
    assert native.helper.current() is not None  # this host has 2 cores or more
    got = {}
    for beside in (True, False, True):
        ys = {name: y.clone() for name, y in base.items()}
        assert table.start(x, scales, 0, beside)
        table.finish(True, x, ys, scales, 0)
        got.setdefault(beside, ys)
        assert all(torch.equal(ys[name], got[beside][name]) for name in ys)
    assert all(torch.equal(got[True][name], got[False][name]) for name in base)
    assert table.start(x, scales, 0, True)
    table.finish(True, x, None, scales, 0)  # the base projections raised: the products are dropped
    ys = {name: y.clone() for name, y in base.items()}
    assert table.start(x, scales, 0, True)  # and the table serves the next call
    table.finish(True, x, ys, scales, 0)
    assert all(torch.equal(ys[name], got[True][name]) for name in ys)


@needs_kernels
def test_a_forked_child_gets_a_helper_of_its_own():
    """The helper thread does not survive fork: the child starts its own on first use, and
    computes a table's products beside as the parent does."""
    import os
    import select
    import signal

    g = torch.Generator().manual_seed(6)
    table = random_table(g, 32, {"o_proj": (8, 32)})
    x, scales = torch.randn(2, 32, generator=g), torch.randn(2, 8, generator=g)
    parent = native.helper.current()
    assert parent is not None
    import threading

    other_ready, other_done = threading.Event(), threading.Event()

    def other_thread():  # a second thread with its own helper, alive at the fork: the child
        native.helper.current()  # drops its copy on start, which must not wait for that thread
        other_ready.set()
        other_done.wait()

    other = threading.Thread(target=other_thread)
    other.start()
    other_ready.wait()
    ys = {"o_proj": torch.zeros(2, 32)}
    assert table.start(x, scales, 0)
    table.finish(True, x, ys, scales, 0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        ok = 0
        try:
            mine = native.helper.current()
            got = {"o_proj": torch.zeros(2, 32)}
            if mine is not None and mine is not parent and table.start(x, scales, 0):
                table.finish(True, x, got, scales, 0)
                ok = int(torch.equal(got["o_proj"], ys["o_proj"]))
        finally:
            os.write(write, bytes([ok]))
            os._exit(0)
    os.close(write)
    if not select.select([read], [], [], 120)[0]:  # a child stuck at the fork: fail, do not hang
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        other_done.set()
        pytest.fail("the forked child did not answer within 120 s")
    answer = os.read(read, 1)
    _, status = os.waitpid(pid, 0)
    other_done.set()
    other.join()
    assert answer == bytes([1]) and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert native.helper.current() is parent


def test_the_helper_thread_can_be_switched_off(monkeypatch):
    """LORA_STUDIO_DELTA_THREAD=0: no helper (deltas are computed on the calling thread); a
    thread's helper is made once, on its first use."""
    import threading

    seen = {}

    def probe(key):
        seen[key] = (native.helper.current(), native.helper.current())

    monkeypatch.setenv("LORA_STUDIO_DELTA_THREAD", "0")
    thread = threading.Thread(target=probe, args=("off",))
    thread.start()
    thread.join()
    assert seen["off"] == (None, None)
    monkeypatch.setenv("LORA_STUDIO_DELTA_THREAD", "1")
    thread = threading.Thread(target=probe, args=("on",))
    thread.start()
    thread.join()
    first, again = seen["on"]
    assert again is first
    assert (first is not None) == (native.available() and native.helper.enabled())


@needs_kernels
def test_unused_ranks_add_exactly_nothing():
    g = torch.Generator().manual_seed(3)
    table = random_table(g, 64, {"gate_proj": (8, 96), "up_proj": (8, 96)})
    x = torch.randn(6, 64, generator=g)
    scale = torch.randn(6, 16, generator=g)
    scale[2] = 0.0  # a row that uses none of this table's ranks
    scale[4, 8:] = 0.0  # a row that uses only gate_proj's
    ys = {name: torch.randn(6, 96, generator=g) for name in ("gate_proj", "up_proj")}
    before = {name: y.clone() for name, y in ys.items()}
    table.apply(x, ys, scale)
    assert isinstance(table.kernel, native.NativeTable)
    assert torch.equal(ys["gate_proj"][2], before["gate_proj"][2])
    assert torch.equal(ys["up_proj"][2], before["up_proj"][2])
    assert torch.equal(ys["up_proj"][4], before["up_proj"][4])
    assert not torch.equal(ys["gate_proj"][4], before["gate_proj"][4])


@needs_kernels
def test_table_kernel_refuses_tensors_of_other_shapes():
    g = torch.Generator().manual_seed(8)
    table = random_table(g, 16, {"q_proj": (4, 16), "k_proj": (4, 8)})
    kernel = native.table_kernel(table.A, table.members)
    x, scales = torch.randn(3, 16, generator=g), torch.randn(3, 10, generator=g)
    assert not kernel.start(x[:, :12].contiguous(), scales, 0, None)  # x narrower than A
    assert not kernel.start(x, scales, 3, None)  # fewer scale columns than ranks from column 3
    assert not kernel.start(x, scales[:, :6].contiguous(), 0, None)
    assert not kernel.start(torch.randn(3, 32, generator=g)[:, :16], scales, 0, None)  # rows apart
    assert not kernel.start(x.double(), scales.double(), 0, None)
    assert not kernel.start(x.requires_grad_(), scales, 0, None)  # autograd keeps the torch path
    x = x.detach()
    big = torch.randn(native.MAX_ROWS + 1, 16, generator=g)
    assert not kernel.start(big, torch.randn(native.MAX_ROWS + 1, 8, generator=g), 0, None)
    assert kernel.start(x, scales, 2, None)
    short = {"q_proj": torch.zeros(3, 16), "k_proj": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match=r"k_proj: the table's products are \(3, 8\), its output is \(2, 8\)"):
        kernel.finish(short)  # an output short of rows: a clear error, nothing written
    assert not short["q_proj"].any()
    ys = {"q_proj": torch.zeros(3, 16), "k_proj": torch.zeros(3, 8)}
    assert kernel.start(x, scales, 2, None)  # the failed call left the table usable
    kernel.finish(ys)
    want = plain(table, x, {"q_proj": torch.zeros(3, 16), "k_proj": torch.zeros(3, 8)}, scales[:, 2:10])
    assert all(torch.allclose(ys[k].double(), want[k], atol=1e-5) for k in ys)


def test_many_rows_take_the_torch_path():
    g = torch.Generator().manual_seed(4)
    table = random_table(g, 32, {"o_proj": (8, 32)})
    rows = native.MAX_ROWS + 1  # a prompt
    x, scale = torch.randn(rows, 32, generator=g), torch.randn(rows, 8, generator=g)
    scale[:, :6] = 0.0  # even using few of the ranks
    ys = {"o_proj": torch.randn(rows, 32, generator=g)}
    want = ys["o_proj"].clone().addmm_(F.linear(x, table.A).mul_(scale), table.members[0][3])
    table.apply(x, ys, scale)
    assert torch.equal(ys["o_proj"], want)  # bit for bit: the same torch operations


def random_experts(g, E=8, r=4, d=48, f=80, modules=("gate_proj", "up_proj", "down_proj")) -> LayerExperts:
    experts = LayerExperts()
    for name in modules:
        d_in, d_out = (f, d) if name == "down_proj" else (d, f)
        experts[name] = (torch.randn(E, r, d_in, generator=g) / d_in**0.5, torch.randn(E, d_out, r, generator=g) / r)
    return experts


@needs_kernels
@pytest.mark.parametrize(
    "modules", [("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("gate_proj", "up_proj")]
)
@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_experts_kernel_routes_and_mixes_like_the_torch_path(modules, tokens):
    g = torch.Generator().manual_seed(tokens)
    experts = random_experts(g, modules=modules)
    router = torch.randn(8, 48, generator=g)
    x, gate, up = (torch.randn(tokens, n, generator=g) for n in (48, 80, 80))
    act = torch.nn.SiLU()
    got = expert_mixture(x, gate, up, router, experts, 2, act)
    kernel = experts.stacked()["native"]
    assert isinstance(kernel, native.NativeExperts)
    experts.stacked()["native"] = None  # the torch path, for the same experts
    want = expert_mixture(x, gate, up, router, experts, 2, act)
    mixed, down, logits, probs, chosen = got
    assert torch.equal(chosen, want[4])
    torch.testing.assert_close(logits, want[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(probs, want[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed, want[0], rtol=0, atol=1e-5)
    if "down_proj" in modules:
        torch.testing.assert_close(down, want[1], rtol=0, atol=1e-5)
    else:
        assert down is None and want[1] is None
    # the picks given (the path autograd-free callers of `_picked_mixture` take), against the loop
    weights = torch.rand(tokens, 2, generator=g)
    picks = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    given = kernel.picked(x, gate, up, picks, weights)
    loop = torch.zeros(tokens, 80), torch.zeros(tokens, 48)
    for n in range(tokens):
        for p in range(2):
            e, w = int(picks[n, p]), weights[n, p]
            lora = {name: B[e] @ (A[e] @ v) for name, (A, B) in experts.items() for v in [x[n]] if name != "down_proj"}
            m = F.silu(gate[n] + lora.get("gate_proj", 0)) * (up[n] + lora.get("up_proj", 0))
            loop[0][n] += w * m
            if "down_proj" in experts:
                A, B = experts["down_proj"]
                loop[1][n] += w * (B[e] @ (A[e] @ m))
    torch.testing.assert_close(given[0], loop[0], rtol=0, atol=1e-5)
    if "down_proj" in modules:
        torch.testing.assert_close(given[1], loop[1], rtol=0, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("modules", [("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj")])
def test_experts_begun_beside_the_base_projections_equal_expert_mixture(modules):
    """`begin_mixture` (routing and gate/up deltas on the helper thread, the rest in `finish`)
    gives `expert_mixture`'s result bit for bit; a prompt's many tokens are not begun."""
    from fusion.methods.mixlora_ffn import begin_mixture

    g = torch.Generator().manual_seed(11)
    experts = random_experts(g, modules=modules)
    router = torch.randn(8, 48, generator=g)
    x, gate, up = (torch.randn(5, n, generator=g) for n in (48, 80, 80))
    want = expert_mixture(x, gate, up, router, experts, 2, F.silu)
    assert native.helper.current() is not None
    for _ in range(3):  # the helper serves call after call
        pending = begin_mixture(x, router, experts, 2, F.silu)
        assert pending is not None and pending.helper is native.helper.current()
        got = pending.finish(gate, up)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
    assert begin_mixture(torch.randn(native.MAX_ROWS + 1, 48), router, experts, 2, F.silu) is None
    assert begin_mixture(x, router, experts, 2, torch.nn.GELU()) is None  # not SiLU: the torch path
    pending = begin_mixture(x, router, experts, 2, F.silu)
    assert pending.finish(gate[:, :70], up[:, :70]) is None  # other f: the caller takes the torch path


def test_experts_kernel_serves_only_silu_and_inference():
    g = torch.Generator().manual_seed(5)
    experts = random_experts(g)
    assert native.experts_kernel(experts.stacked(), experts, torch.nn.GELU()) is None
    if not native.available():
        return
    trained = {name: (A.clone().requires_grad_(), B) for name, (A, B) in experts.items()}
    stacked = {name: B.transpose(1, 2).contiguous() for name, (_, B) in trained.items()}
    stacked["A_in"] = torch.cat([trained["gate_proj"][0], trained["up_proj"][0]], 1)
    assert native.experts_kernel(stacked, trained, F.silu) is None  # experts being trained
    kernel = native.experts_kernel(experts.stacked(), experts, F.silu)
    x = torch.randn(1, 48, requires_grad=True)
    gate, up = torch.randn(1, 80), torch.randn(1, 80)
    assert kernel.routed(x, gate, up, torch.randn(8, 48), 2) is None  # autograd: the torch path
    assert kernel.routed(x.detach()[:, :40], gate, up, torch.randn(8, 40), 2) is None  # wrong width
    assert kernel.routed(x.detach(), gate[:, :70], up[:, :70], torch.randn(8, 48), 2) is None  # other f


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The kernels loaded anew, with their build in an empty cache folder; the cached library
    of this process comes back afterwards."""
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path))
    native.forget_loaded()
    yield tmp_path / "native"
    native.forget_loaded()


def test_the_library_is_built_once_into_the_cache(fresh_build):
    if native.build.compiler_or_none() is None:
        pytest.skip("no C compiler here")
    fresh_build.mkdir(parents=True)
    (fresh_build / "kernels-0123456789abcdef.so").write_bytes(b"an earlier build")
    assert native.available()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"  # the earlier one went
    stamp = built[0].stat().st_mtime_ns
    assert native.build.build() == built[0]  # found, not compiled again
    assert built[0].stat().st_mtime_ns == stamp
    assert list(fresh_build.iterdir()) == built  # no temporary file left


def test_a_failing_compiler_leaves_the_torch_path_and_nothing_behind(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build
    with caplog.at_level(logging.WARNING, logger="fusion.native"):
        assert not native.available()
    assert "C kernels unavailable" in caplog.text
    assert not fresh_build.exists() or not list(fresh_build.iterdir())
    g = torch.Generator().manual_seed(6)
    table = random_table(g, 16, {"o_proj": (4, 16)})
    x, scale, ys = torch.randn(2, 16, generator=g), torch.randn(2, 4, generator=g), {"o_proj": torch.zeros(2, 16)}
    want = plain(table, x, ys, scale)
    table.apply(x, ys, scale)
    assert table.kernel is None
    torch.testing.assert_close(ys["o_proj"].double(), want["o_proj"], rtol=0, atol=1e-5)


def test_the_kernels_can_be_switched_off(fresh_build, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_NATIVE", "0")
    assert not native.available()
    assert not fresh_build.exists()  # nothing was built
    experts = random_experts(torch.Generator().manual_seed(7))
    assert mixlora_ffn._native(experts.stacked(), experts, F.silu) is None


@needs_kernels
@pytest.mark.parametrize("with_table", [True, False])
def test_flow_kernel_gives_the_gates_and_scales_of_the_torch_path(with_table):
    """Five rows, three of them LoRA-Flow ones with k = 3, 2 (padding slot masked) and 3 gate
    slots, one at temperature 0.7, against the gates and scales computed in float64."""

    g = torch.Generator().manual_seed(9)
    rows, S, d, width = 5, 3, 24, 11
    x = torch.randn(rows, 40, generator=g)[:, :d]  # a strided view
    flow_rows = torch.tensor([0, 3, 4])
    W, b = torch.randn(3, S, d, generator=g), torch.randn(3, S, generator=g) * 0.1
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]])
    temps = torch.tensor([[1.0], [1.0], [0.7]])
    coef = torch.randn(rows, width, generator=g) if with_table else None
    slots = torch.randint(0, S + 1, (rows, width), generator=g) if with_table else None
    if with_table:
        slots[[1, 2]] = 0  # static rows scale by their coefficients only
        slots[3][slots[3] == 3] = 1  # the k=2 row uses its two slots
    weights, scales = native.flow_call(rows, d, flow_rows, W, b, mask, temps, coef, slots).run(x)
    logits = torch.einsum("jsd,jd->js", W.double(), x[flow_rows].double()) / temps.double() + mask.double()
    want = torch.softmax(logits, -1) + b.double()
    torch.testing.assert_close(weights.double(), want, rtol=0, atol=1e-6)
    assert weights[1, 2] == b[1, 2]  # the masked slot's probability is exactly 0
    if not with_table:
        assert scales is None
        return
    table = torch.ones(rows, S + 1, dtype=torch.float64)
    table[flow_rows, 1:] = want
    torch.testing.assert_close(scales.double(), table.gather(1, slots) * coef.double(), rtol=0, atol=1e-6)
    assert torch.equal(scales[1], coef[1]) and torch.equal(scales[2], coef[2])
