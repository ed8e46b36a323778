"""The Triton kernels as PyTorch custom operators: registration checks and ``torch.compile`` without breaks.

``torch.library.opcheck`` checks each ``sh2::`` operator's schema, its fake (shape-only) implementation
against the real one, its autograd registration and its behaviour under AOT dispatch with dynamic shapes.
Then functions and whole SH2 blocks that call the public kernel functions are compiled with
``fullgraph=True`` (any graph break is an error) and must match eager, forward and backward. The Triton
bodies run on the CPU interpreter, so every shape is tiny.
"""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import rel_err

from sh2 import kernels
from sh2.kernels import fft, fir, modal, short_conv, use_backend

F32, BF16 = torch.float32, torch.bfloat16
# as the ``device`` fixture: the GPU where there is one, else the CPU with the Triton interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _randn(*shape, seed=0, dtype=F32, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def _gated(B, L, D, G, K, bias, grad, dtype=F32):
    q, k, v = (_randn(B, L, D, seed=i, dtype=dtype, grad=grad) for i in range(3))
    h = _randn(G, K, seed=3, grad=grad) / K**0.5
    h = h.detach().requires_grad_(grad)
    b = _randn(D, seed=4, grad=grad) if bias else None
    return q, k, v, h, b


def _opcheck(op, args) -> None:
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("G,K", [(2, 5), (8, 3)], ids=["blocked", "direct"])
def test_opcheck_gated_fir_conv(G, K, bias):
    args = _gated(2, 9, 32 if G == 2 else 8, G, K, bias, grad=True)
    _opcheck(torch.ops.sh2.gated_fir_conv.default, args)
    dy = _randn(*args[0].shape, seed=9)
    _opcheck(torch.ops.sh2.gated_fir_conv_backward.default, (*(x.detach() if x is not None else None
                                                                for x in args), dy))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("save,keep", [(True, True), (True, False), (False, False)])
def test_opcheck_gated_fft_conv(save, keep, bias):
    args = _gated(2, 6, 8, 4, 6, bias, grad=save)
    _opcheck(torch.ops.sh2.gated_fft_conv.default, (*args, save, keep))
    if save:
        q, k, v, h, b = (x.detach() if x is not None else None for x in args)
        _, saved, spectrum = torch.ops.sh2.gated_fft_conv(q, k, v, h, b, True, keep)
        _opcheck(torch.ops.sh2.gated_fft_conv_backward.default, (q, k, v, h, b, saved, spectrum, _randn(2, 6, 8)))


def test_opcheck_causal_depthwise_conv():
    x, w = _randn(2, 7, 5, grad=True), _randn(5, 3, seed=1, grad=True)
    _opcheck(torch.ops.sh2.causal_depthwise_conv.default, (x, w))
    _opcheck(torch.ops.sh2.causal_depthwise_conv_backward.default, (x.detach(), w.detach(), _randn(2, 7, 5, seed=2)))


@pytest.mark.parametrize("double", [True, False], ids=["f64", "f32"])
def test_opcheck_rope_cos_sin(double):
    _opcheck(torch.ops.sh2.rope_cos_sin.default, (torch.arange(7, device=DEVICE), 8, 500.0, 2.0, double))
    _opcheck(torch.ops.sh2.rope_cos_sin.default, (torch.arange(6, device=DEVICE).view(2, 3), 4, 1e4, 1.0, double))


def test_rope_tables_round_each_angle_once():
    """Angles are formed in float64 and rounded to fp32 once: at positions near 1M each table entry is within
    half an fp32 ulp of its angle (plus cos/sin rounding) of the float64 formula."""
    from sh2.models.attention import rope_cos_sin

    pos = torch.tensor([0, 1, 777, 999_999, 1_048_575], device=DEVICE)
    cos, sin = rope_cos_sin(pos, 16, 10000.0, 3.0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = torch.cat([pos.cpu().double()[:, None] / 3.0 * inv] * 2, dim=-1)
    bound = ang.abs() * 2.0**-24 + 1e-6
    assert cos.dtype == sin.dtype == F32 and cos.shape == (5, 16)
    assert ((cos.cpu().double() - ang.cos()).abs() <= bound).all()
    assert ((sin.cpu().double() - ang.sin()).abs() <= bound).all()
    cos64, sin64 = rope_cos_sin(pos, 16, 10000.0, 3.0, torch.float64)
    torch.testing.assert_close(cos64.cpu(), ang.cos(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sin64.cpu(), ang.sin(), rtol=0, atol=1e-12)


def test_opcheck_modal_filter():
    lp = (-0.1 * _randn(3, 4).abs()).requires_grad_(True)
    r = _randn(3, 4, seed=1, grad=True)
    _opcheck(torch.ops.sh2.modal_filter.default, (lp, r, 9))
    _opcheck(torch.ops.sh2.modal_filter_backward.default, (lp.detach(), r.detach(), _randn(3, 9, seed=2)))


@pytest.mark.parametrize("bias,state", [(True, True), (False, False)], ids=["bias-state", "plain"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
def test_opcheck_gated_modal_conv(save, bias, state):
    q, k, v = (_randn(2, 11, 6, seed=i, grad=save) for i in range(3))
    lp = (-0.2 * _randn(6, 4, seed=3).abs()).requires_grad_(save)
    r = _randn(6, 4, seed=4, grad=save)
    b = _randn(6, seed=5, grad=save) if bias else None
    s0 = _randn(2, 6, 4, seed=6, grad=save) if state else None
    _opcheck(torch.ops.sh2.gated_modal_conv.default, (q, k, v, lp, r, b, s0, save))
    if save:
        detached = [x.detach() if x is not None else None for x in (q, k, v, lp, r, b, s0)]
        _, _, starts, sig_starts, sig_final = torch.ops.sh2.gated_modal_conv(*detached, True)
        dy, dfinal = _randn(2, 11, 6, seed=7), _randn(2, 6, 4, seed=8)
        _opcheck(torch.ops.sh2.gated_modal_conv_backward.default,
                 (*detached, starts, sig_starts, sig_final, dy, dfinal))


def _fir(q, k, v, h, b):
    return kernels.gated_fir_conv(q, k, v, h, b, backend="triton")


def _fft(q, k, v, h, b):
    return kernels.gated_fft_conv(q, k, v, h, b, backend="triton")


def _li(q, k, v, h, b):
    """The Hyena-LI chain: a modal filter built for the length, then the FFT convolution."""
    lp = -0.05 * (1 + h[:, :3].abs())
    filt = kernels.modal_filter(lp, h[:, 3:6], q.shape[1], backend="triton")
    return kernels.gated_fft_conv(q, k, v, filt, b, backend="triton")


def _modal(q, k, v, h, b):
    """Hyena-LI by its recurrence, with an initial state in and the final state in the loss."""
    lp = -0.05 * (1 + h[:, :3].abs()).repeat(q.shape[-1] // h.shape[0], 1)
    r = h[:, 3:6].repeat(q.shape[-1] // h.shape[0], 1)
    y, s = kernels.gated_modal_conv(q, k, v, lp, r, b, initial_state=q[:, 0, :, None].expand(-1, -1, 3),
                                    return_state=True, backend="triton")
    return y + s.sum(-1)[:, None, :]


def _featurizer(q, k, v, h, b):
    u = torch.cat([q, k, v], dim=-1)
    w = torch.cat([h[:, :3]] * (3 * q.shape[-1] // h.shape[0]), dim=0)
    y = kernels.causal_depthwise_conv(u, w, backend="triton")[..., : q.shape[-1]] * v
    return y + b if b is not None else y


def _compiled_matches_eager(fn, args, tol=1e-6) -> None:
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [x for x in args if x is not None]
    y = fn(*args)
    yc = compiled(*args)
    assert rel_err(yc, y) < tol
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_c = torch.autograd.grad(yc, leaves, dy)
    for g, gc in zip(grads, grads_c):
        assert rel_err(gc, g) < tol


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fn", [_fir, _fft, _li, _modal, _featurizer], ids=["fir", "fft", "li", "modal", "featurizer"])
def test_compile_fullgraph_matches_eager(fn, bias):
    torch._dynamo.reset()
    _compiled_matches_eager(fn, _gated(2, 8, 16, 8, 8, bias, grad=True))


def test_compile_with_bf16_and_strided_views():
    """q, k, v as channel slices of one bf16 projection, as the Hyena operators pass them."""
    torch._dynamo.reset()
    u = _randn(1, 10, 96, dtype=BF16, grad=True)
    h = _randn(2, 7, seed=1, grad=True)

    def fn(u, h):
        q, k, v = u.split(32, dim=-1)
        return kernels.gated_fir_conv(q, k, v, h, None, backend="triton")

    _compiled_matches_eager(fn, (u, h))


def test_autotuner_runs_only_in_eager_operator_bodies(monkeypatch):
    """pick_config is called when the compiled function runs, never while it is being traced."""
    calls = []

    def recording(name, key, candidates, launch, device):
        calls.append((name, torch.compiler.is_compiling()))
        return candidates[0]

    for module in (fir, fft, short_conv, modal):
        if hasattr(module, "pick_config"):
            monkeypatch.setattr(module, "pick_config", recording)
    torch._dynamo.reset()
    args = _gated(1, 8, 32, 2, 5, True, grad=True)
    y = torch.compile(_fir, fullgraph=True, backend="aot_eager")(*args)
    y.sum().backward()
    names = {n for n, _ in calls}
    assert {"fir_fwd", "fir_blocked_bwd"} <= names
    assert not any(compiling for _, compiling in calls)


def test_compile_sh2_blocks_without_graph_breaks():
    """Each SH2 block (SE, MR, LI, attention) compiles whole, calls the sh2 operators, and matches eager."""
    from sh2.models.config import SH2Config
    from sh2.models.model import SH2Block

    cfg = SH2Config(hidden_size=32, num_layers=4, num_heads=2, mlp_hidden_size=48, layout="SDH*", se_groups=2,
                    mr_groups=2, mr_filter_len=16, li_state_size=4)
    expected = {"SE": {"causal_depthwise_conv", "gated_fir_conv"}, "MR": {"causal_depthwise_conv", "gated_fir_conv"},
                "LI": {"causal_depthwise_conv", "gated_modal_conv"}, "MHA": {"rope_cos_sin"}}
    torch.manual_seed(0)
    x = torch.randn(2, 12, 32, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        for i, op in enumerate(cfg.operators):
            block = SH2Block(cfg, i).to(DEVICE)
            called: set[str] = set()

            def recording_backend(gm, example_inputs, called=called):
                called.update(str(n.target).split(".")[-2] for n in gm.graph.nodes
                              if str(n.target).startswith("sh2."))
                return gm.forward

            torch._dynamo.reset()
            torch.compile(block, fullgraph=True, backend=recording_backend)(x)
            assert called == expected[op], op
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
            params = list(block.parameters())
            y = block(x)
            yc = compiled(x)
            assert rel_err(yc, y) < 1e-6, op
            dy = torch.randn_like(y)
            for g, gc in zip(torch.autograd.grad(y, [x, *params], dy), torch.autograd.grad(yc, [x, *params], dy)):
                assert rel_err(gc, g) < 1e-6, op
