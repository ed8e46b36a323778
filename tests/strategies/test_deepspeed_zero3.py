"""DeepSpeed ZeRO-3 builds the model partitioned (``deepspeed.zero.Init``): sh2's initialisation and
``init_from`` must still reach the weights. Runs on CPU (gloo, one process) where deepspeed is installed; skipped
otherwise (deepspeed is an optional extra and not part of the CPU test install).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from cp_harness import run_distributed

pytest.importorskip("deepspeed")

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


def _strategy(rank: int) -> object:
    """ContextParallelDeepSpeedStrategy with ZeRO-3, as configure_model sees it, with this process's rank."""
    import torch.distributed as dist

    from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy

    class _Strategy(ContextParallelDeepSpeedStrategy):
        @property
        def global_rank(self) -> int:  # set by Lightning's process setup, which this test does not run
            return rank

        def broadcast(self, obj: object, src: int = 0) -> object:
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]

    strategy = _Strategy(cp={"size": 1}, stage=3)
    assert strategy.builds_partitioned_model
    return strategy


def _build_partitioned(rank: int, init_from: str | None) -> torch.nn.Module:
    import deepspeed

    from sh2.training.module import SH2LightningModule

    module = SH2LightningModule(preset="tiny", seq_len=64, init_from=init_from)
    module._trainer = SimpleNamespace(strategy=_strategy(rank))
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):  # what Lightning's model_sharded_context does
        module.configure_model()
    return module.model


def _zero3_worker(rank: int, world: int, path: str) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from sh2.checkpoints import CheckpointError
    from sh2.models import SH2Config
    from sh2.models.model import SH2Model

    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(rank)  # different seeds per rank: rank 0's initialisation must win everywhere
    model = _build_partitioned(rank, None)
    assert model.embedding.weight.numel() < 512 * 128  # partitioned: a placeholder outside a gather
    with GatheredParameters(list(model.parameters())):
        # sh2's init (std init_std = 0.02), not nn.Embedding's N(0, 1): the loss starts near ln(vocab)
        assert abs(float(model.embedding.weight.std()) - model.config.init_std) < 0.1 * model.config.init_std
        reference = SH2Model(SH2Config.from_name("tiny"))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.shape == q.shape, name
            if p.numel() > 1000:  # the same distributions as an ordinary build
                assert abs(float(p.std()) - float(q.std())) < 0.1 * float(q.std()) + 1e-6, name
        ids = torch.randint(0, 512, (1, 65), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[0, 1:])
        assert abs(float(loss) - math.log(512)) < 0.5, float(loss)
        gathered = torch.cat([p.detach().flatten() for p in model.parameters()])
    others = [torch.empty_like(gathered) for _ in range(world)]
    dist.all_gather(others, gathered)
    assert all(torch.equal(o, others[0]) for o in others)  # one model on every rank

    # init_from: only rank 0 has the file; every rank gets its weights
    source = SH2Model(SH2Config.from_name("tiny"))
    if rank == 0:
        torch.save(source.state_dict(), path)
    dist.barrier()
    mine = path if rank == 0 else path + ".not-on-this-rank"
    loaded = _build_partitioned(rank, mine)
    expected = [source.state_dict()[n] for n, _ in loaded.named_parameters()]
    dist.broadcast_object_list(expected, src=0)
    with GatheredParameters(list(loaded.parameters())):
        for (name, p), q in zip(loaded.named_parameters(), expected):
            assert torch.equal(p.detach(), q), name

    # a bad checkpoint stops every rank with the same message (no rank left waiting in a gather)
    try:
        _build_partitioned(rank, path + ".missing")
    except CheckpointError as err:
        assert "Fix: point model.init_from at an existing" in str(err)
    else:
        raise AssertionError("no error")


@pytest.mark.slow
def test_zero3_partitioned_model_gets_sh2_init_and_init_from_on_two_ranks(tmp_path) -> None:
    run_distributed(_zero3_worker, 2, str(tmp_path / "weights.pt"))
