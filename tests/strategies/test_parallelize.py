"""Model transforms applied from outside the model: activation checkpointing, compilation, CP operators.

Each must leave the numbers of the plain model unchanged (forward and backward), keep parameter names and
state-dict keys, and be idempotent; removing the CP operators restores the single-process model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sh2.models.config import SH2Config
from sh2.models.model import SH2Model
from sh2.models.seqops import LOCAL_OPS
from sh2.strategies import (
    CPConfig,
    CPSequenceOps,
    apply_activation_checkpointing,
    apply_compile,
    apply_context_parallel,
    remove_context_parallel,
)
from sh2.strategies.cp_comm import CPGroup

# every operator type (SE, MR, LI, MHA) in a model small enough to compile on a CPU
CONFIG = dict(hidden_size=32, num_layers=4, num_heads=2, mlp_hidden_size=64, se_groups=2, mr_groups=2,
              layout="SDH*", mr_filter_len=16, mr_ref_len=64, li_state_size=4, max_seq_len=64, vocab_size=512)


def _model() -> SH2Model:
    torch.manual_seed(0)
    return SH2Model(SH2Config(**CONFIG))


def _loss_and_grads(model: SH2Model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _batch(length: int = 48) -> torch.Tensor:
    return torch.randint(0, 512, (2, length + 1), generator=torch.Generator().manual_seed(1))


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradients() -> None:
    eager, checkpointed = _model(), _model()
    apply_activation_checkpointing(checkpointed)
    apply_activation_checkpointing(checkpointed)  # idempotent: one level of checkpointing
    assert [type(b).__name__ for b in checkpointed.blocks] == ["CheckpointedSH2Block"] * 4
    assert list(checkpointed.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in eager.named_parameters()]

    calls = []
    checkpointed.blocks[2].mixer.register_forward_hook(lambda *_: calls.append(1))
    ids = _batch()
    ref_loss, ref_grads = _loss_and_grads(eager, ids)
    loss, grads = _loss_and_grads(checkpointed, ids)
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass
    # the recomputation replays the same float operations: identical results
    assert torch.equal(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)

    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(ids), eager(ids), rtol=0, atol=0)
    checkpointed.eval()
    checkpointed(ids).sum().backward()
    assert len(calls) == 2  # no recomputation outside training with gradients


@pytest.mark.parametrize("backend,preset", [
    ("aot_eager", "tiny"),  # dynamo + AOTAutograd: every sh2 operator traced, forward and backward graphs
    pytest.param("inductor", None, marks=pytest.mark.slow),  # generated C++ kernels (minutes on a small CPU)
])
def test_compiled_blocks_match_eager_forward_and_backward(backend, preset) -> None:
    config = SH2Config.from_name(preset) if preset else SH2Config(**CONFIG)
    torch.manual_seed(0)
    eager = SH2Model(config)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend=backend)
    impls = [block._compiled_call_impl for block in compiled.blocks]
    assert all(impl is not None for impl in impls)
    apply_compile(compiled, backend=backend)  # idempotent: the blocks keep their compiled code
    assert [block._compiled_call_impl for block in compiled.blocks] == impls
    assert list(compiled.state_dict()) == list(eager.state_dict())

    ids = _batch()
    ref_loss, ref_grads = _loss_and_grads(eager, ids)
    loss, grads = _loss_and_grads(compiled, ids)
    # compiled graphs may fuse and reorder fp32 arithmetic: rounding differences only, far below the 1e-3 an
    # error in a compiled operator would show
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for (name, _), a, b in zip(eager.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_context_parallel_operators_are_set_once_and_removed() -> None:
    model = _model()
    ids = _batch()
    with torch.no_grad():
        reference = model(ids)
    pair = CPGroup(group=None, rank=0, size=2, global_ranks=[0, 1])
    ops = apply_context_parallel(model, pair, CPConfig(li_scheme="p2p_fft"))
    assert isinstance(ops, CPSequenceOps) and all(b.mixer.ops is ops for b in model.blocks)
    assert apply_context_parallel(model, pair, CPConfig(li_scheme="p2p_fft")) is ops  # idempotent
    other = apply_context_parallel(model, pair, CPConfig(li_scheme="a2a"))  # other settings: replaced
    assert other is not ops and all(b.mixer.ops is other for b in model.blocks)

    remove_context_parallel(model)
    assert all(b.mixer.ops is LOCAL_OPS for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(ids), reference)
    remove_context_parallel(model)  # idempotent
    assert all(b.mixer.ops is LOCAL_OPS for b in model.blocks)


def test_context_parallel_settings_are_checked_against_the_model() -> None:
    model = _model()
    with pytest.raises(ValueError, match="num_heads=2 is not divisible by cp.size=4"):
        apply_context_parallel(model, CPGroup(group=None, rank=0, size=4, global_ranks=[0, 1, 2, 3]))
    assert all(b.mixer.ops is LOCAL_OPS for b in model.blocks)  # nothing set when the check fails


def test_transforms_compose_in_the_module_order() -> None:
    # activation checkpointing, then compilation of the checkpointed blocks (the order of configure_model)
    eager, model = _model(), copy.deepcopy(_model())
    apply_activation_checkpointing(model)
    apply_compile(model, backend="aot_eager")  # traces the checkpointed forward without inductor's codegen
    ids = _batch(32)
    ref_loss, ref_grads = _loss_and_grads(eager, ids)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_checkpointed_blocks_compile_whole_when_they_make_the_first_kernel_call(monkeypatch) -> None:
    """The kernel settings are read on first use. When that use is inside a compiled, checkpointed block, reading
    them must not be a side effect of the traced code: dynamo would break the graph and silently run the
    whole block eagerly (``fullgraph=True`` turns such a break into an error here)."""
    from sh2.kernels import settings

    monkeypatch.setattr(settings, "_current", None)
    model = _model()
    apply_activation_checkpointing(model)
    apply_compile(model, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(model, _batch(16))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
