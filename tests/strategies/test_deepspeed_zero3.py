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


def _build_partitioned(init_from: str | None) -> torch.nn.Module:
    import deepspeed

    from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy
    from sh2.training.module import SH2LightningModule

    module = SH2LightningModule(preset="tiny", seq_len=64, init_from=init_from)
    module._trainer = SimpleNamespace(strategy=ContextParallelDeepSpeedStrategy(context_parallel_size=1, stage=3))
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):  # what Lightning's model_sharded_context does
        module.configure_model()
    return module.model


def _zero3_worker(rank: int, world: int, path: str) -> None:
    from deepspeed.runtime.zero import GatheredParameters

    from sh2.models import SH2Config
    from sh2.models.model import SH2Model

    torch.manual_seed(0)
    model = _build_partitioned(None)
    assert model.embedding.weight.numel() == 0  # partitioned: a placeholder outside a gather
    with GatheredParameters(list(model.parameters())):
        # sh2's init (std init_std = 0.02), not nn.Embedding's N(0, 1): the loss starts near ln(vocab)
        assert abs(float(model.embedding.weight.std()) - model.config.init_std) < 0.1 * model.config.init_std
        reference = SH2Model(SH2Config.from_name("tiny"))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.shape == q.shape, name
            if p.numel() > 1000:  # the same distributions as an ordinary build
                assert abs(float(p.std()) - float(q.std())) < 0.1 * float(q.std()) + 1e-6, name
        ids = torch.randint(0, 512, (1, 65), generator=torch.Generator().manual_seed(1))
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[0, 1:])
        assert abs(float(loss) - math.log(512)) < 0.5, float(loss)

    source = SH2Model(SH2Config.from_name("tiny"))
    torch.save(source.state_dict(), path)
    loaded = _build_partitioned(path)
    with GatheredParameters(list(loaded.parameters())):
        for (name, p), q in zip(loaded.named_parameters(), source.parameters()):
            assert torch.equal(p, q), name


def test_zero3_partitioned_model_gets_sh2_init_and_init_from(tmp_path) -> None:
    os.environ.setdefault("LOCAL_RANK", "0")
    run_distributed(_zero3_worker, 1, str(tmp_path / "weights.pt"))
