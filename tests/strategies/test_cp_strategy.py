"""ContextParallelStrategy in Lightning: same training losses as one process; bad settings fail at start.

A small LightningModule uses the strategy as sh2's module does, through its contract (``configure_model``
calls ``parallelize_model``; the loss goes through ``reduce_loss``). Two gloo processes train with CP = 2 and
FSDP2 and must log the losses of a plain single-process loop on the same batches.
"""

from __future__ import annotations

import os
import tempfile

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cp_harness import run_distributed

from sh2.data.datamodule import SH2DataModule
from sh2.models.config import SH2Config
from sh2.models.model import SH2Model
from sh2.strategies import (
    ContextParallelStrategy,
    CPConfig,
    apply_activation_checkpointing,
    apply_compile,
    strategy_contract,
)
from sh2.strategies.contract import DataLayout
from sh2.strategies.cp_ops import check_sequence_length, validate_cp_settings
from sh2.strategies.sharding import shard_batch

CONFIG = dict(hidden_size=32, num_layers=4, num_heads=4, mlp_hidden_size=64, se_groups=4, mr_groups=4,
              layout="SDH*", mr_filter_len=8, li_state_size=4, mr_ref_len=64, max_seq_len=64)
STEPS, LR = 3, 1e-2


def make_batches(length: int = 32, n: int = STEPS, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 256, (batch, length + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:],
                    "loss_weights": (torch.rand(batch, length, generator=g) > 0.1).float()})
    return out


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.items = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def loss_terms(model: SH2Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["input_ids"], batch.get("position_ids"))
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    w = batch["loss_weights"].flatten()
    return (ce * w).sum(), w.sum()


class ContractModule(L.LightningModule):
    """sh2's module in 30 lines: the model built, then changed from outside, and the loss through the contract."""

    def __init__(self, config: dict, activation_checkpointing: bool = False, compiled: bool = False) -> None:
        super().__init__()
        self.cfg = config
        self.activation_checkpointing = activation_checkpointing
        self.compiled = compiled
        self.model: SH2Model | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = SH2Model(SH2Config(**self.cfg))
        if self.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.compiled:  # traced without code generation; a graph break is an error
            apply_compile(self.model, backend="aot_eager", fullgraph=True)
        strategy_contract(self.trainer.strategy).parallelize_model(self.model)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = strategy_contract(self.trainer.strategy).reduce_loss(*loss_terms(self.model, batch))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=LR, foreach=False)


def reference_losses(batches: list[dict[str, torch.Tensor]]) -> list[float]:
    torch.manual_seed(0)
    model = SH2Model(SH2Config(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses = []
    for b in batches:
        loss_sum, weight_sum = loss_terms(model, b)
        loss = loss_sum / weight_sum.clamp_min(1.0)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _trainer(strategy: ContextParallelStrategy, root: str, steps: int = STEPS, precision: str = "32-true"
             ) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                     precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=root)


def _strategy_job(rank: int, world: int, root: str) -> None:
    batches = make_batches()
    expected = reference_losses(batches)
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=2, shuffle=False)

    for scheme in ({}, {"li_scheme": "p2p_fft", "attention_scheme": "ring", "fir_scheme": "a2a"}):
        module = ContractModule(CONFIG)
        strategy = ContextParallelStrategy(cp={"size": 2, **scheme})
        trainer = _trainer(strategy, root)
        trainer.fit(module, loader)
        # idempotent: a second call applies nothing twice (FSDP2's fully_shard raises when applied again)
        assert strategy.parallelize_model(module.model) is module.model
        assert strategy.data_parallel_size == 1 and strategy.data_parallel_rank == 0
        assert strategy.context_parallel_rank == rank
        errs = [abs(a - b) / abs(b) for a, b in zip(module.losses, expected)]
        assert len(module.losses) == STEPS and max(errs) < 1e-5, (scheme, module.losses, expected)

    # bf16 compute (FSDP2 MixedPrecisionPolicy; LI mixers in their own fp32 unit): close to fp32, also with
    # activation checkpointing (blocks recomputed in the backward: the combination that failed on 4 H100s), and
    # with compiled blocks under autocast (the LI block then one fp32 unit: a nested unit would break the graph)
    for ckpt_blocks, compiled in ((False, False), (True, False), (True, True)):
        module = ContractModule(CONFIG, activation_checkpointing=ckpt_blocks, compiled=compiled)
        precision = "bf16-mixed" if compiled else "32-true"
        _trainer(ContextParallelStrategy(cp={"size": 2}, mixed_precision="bf16"), root,
                 precision=precision).fit(module, loader)
        assert max(abs(a - b) / b for a, b in zip(module.losses, expected)) < 1e-2, (module.losses, expected)
        assert module.model.blocks[2].mixer.filter.R.dtype == torch.float32

    # sharded checkpoint with every rank's data state, then resume for one more step
    ckpt = os.path.join(root, "cp.ckpt")
    trainer.save_checkpoint(ckpt)
    assert os.path.isfile(os.path.join(ckpt, f"data_state_rank{rank}.pt"))
    module = ContractModule(CONFIG)
    resumed = _trainer(ContextParallelStrategy(cp={"size": 2}), root, steps=STEPS)
    resumed.fit(module, torch.utils.data.DataLoader(_Batches(make_batches(n=STEPS + 1)), batch_size=2),
                ckpt_path=ckpt)
    assert resumed.global_step == STEPS

    # bad settings fail at start, naming the setting
    with pytest.raises(ValueError, match="not divisible by cp.size=4"):
        _trainer(ContextParallelStrategy(cp={"size": 4}), root).fit(ContractModule(CONFIG), loader)
    with pytest.raises(ValueError, match="num_heads=1 is not divisible by cp.size=2"):
        _trainer(ContextParallelStrategy(cp={"size": 2}), root).fit(ContractModule({**CONFIG, "num_heads": 1}), loader)
    odd = torch.utils.data.DataLoader(_Batches(make_batches(length=30)), batch_size=2)
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp.size = 4"):
        _trainer(ContextParallelStrategy(cp={"size": 2}), root).fit(ContractModule(CONFIG), odd)
    # the datamodule tells the strategy its sequence length: a bad one fails before the model is built
    module = ContractModule(CONFIG)
    with pytest.raises(ValueError, match="sequence length 30 is not divisible by 2 \\* cp.size = 4"):
        _trainer(ContextParallelStrategy(cp={"size": 2}), root).fit(module, datamodule=SH2DataModule(seq_len=30))
    assert module.model is not None and not module.losses  # stopped in the strategy's setup, before any step


class _PerDataRank(L.LightningDataModule):
    """Reads the strategy's data-parallel coordinate, like sh2's datamodule: CP peers get the same half."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        strategy = self.trainer.strategy
        rank, size = strategy.data_parallel_rank, strategy.data_parallel_size
        per = self.batches[0]["input_ids"].shape[0] // size
        mine = [{k: v[rank * per:(rank + 1) * per] for k, v in b.items()} for b in self.batches]
        return torch.utils.data.DataLoader(_Batches(mine), batch_size=per)


def reference_dp_losses(batches: list[dict[str, torch.Tensor]], dp: int) -> list[list[float]]:
    """Per data-parallel rank losses of a loop that averages the dp ranks' losses (what FSDP computes)."""
    torch.manual_seed(0)
    model = SH2Model(SH2Config(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    out: list[list[float]] = [[] for _ in range(dp)]
    for b in batches:
        per = b["input_ids"].shape[0] // dp
        losses = []
        for d in range(dp):
            loss_sum, weight_sum = loss_terms(model, {k: v[d * per:(d + 1) * per] for k, v in b.items()})
            losses.append(loss_sum / weight_sum.clamp_min(1.0))
            out[d].append(float(losses[-1].detach()))
        opt.zero_grad()
        (sum(losses) / dp).backward()
        opt.step()
    return out


def _dp_cp_job(rank: int, world: int, root: str) -> None:
    batches = make_batches(batch=4)
    expected = reference_dp_losses(batches, 2)
    for kwargs in ({}, {"data_parallel_replicate_size": 2}):
        module = ContractModule(CONFIG)
        strategy = ContextParallelStrategy(cp={"size": 2}, **kwargs)
        trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=STEPS, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, default_root_dir=root)
        trainer.fit(module, datamodule=_PerDataRank(batches))
        dp_rank = strategy.data_parallel_rank
        assert (dp_rank, strategy.context_parallel_rank) == (rank // 2, rank % 2)
        errs = [abs(a - b) / abs(b) for a, b in zip(module.losses, expected[dp_rank])]
        assert len(errs) == STEPS and max(errs) < 1e-5, (kwargs, rank, module.losses, expected[dp_rank])


def test_data_parallel_times_context_parallel_matches_the_averaged_loop() -> None:
    """World 4 = dp 2 x cp 2 (FSDP over all 4 ranks, then HSDP 2 x 1 x 2): per-dp-rank losses as expected."""
    with tempfile.TemporaryDirectory() as root:
        run_distributed(_dp_cp_job, 4, root, lightning_env=True)


def test_strategy_trains_like_a_single_process_and_rejects_bad_settings() -> None:
    with tempfile.TemporaryDirectory() as root:
        run_distributed(_strategy_job, 2, root, lightning_env=True)


def test_bad_settings_name_the_setting() -> None:
    cfg = SH2Config(**CONFIG)
    with pytest.raises(ValueError, match="se_groups=4 is not divisible by cp.size=8"):
        validate_cp_settings(cfg, 8, CPConfig(fir_scheme="a2a"))
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by cp.size=8"):
        validate_cp_settings(cfg.replace(layout="SSS*"), 8, CPConfig())
    with pytest.raises(ValueError, match="power of two"):
        validate_cp_settings(cfg, 3, CPConfig(li_scheme="p2p_fft"))
    with pytest.raises(ValueError, match="li_scheme must be one of"):
        CPConfig(li_scheme="ring")
    with pytest.raises(ValueError, match="2 \\* cp.size = 8"):
        check_sequence_length(100, 4)
    validate_cp_settings(cfg, 8, CPConfig(attention_scheme="ring", li_scheme="p2p_fft"))  # p2p FIR: no limit


def test_batch_sharding_is_consistent() -> None:
    b = make_batches(length=16, n=1)[0]
    shards = [shard_batch(b, 2, r) for r in range(2)]
    assert shards[1]["position_ids"].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for key in ("input_ids", "labels", "loss_weights"):
        assert torch.equal(shards[0][key], b[key][:, [0, 1, 2, 3, 12, 13, 14, 15]])


def test_strategies_are_registered_and_deepspeed_is_lazy() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    import sh2.strategies as strategies

    assert {"sh2_cp", "sh2_cp_deepspeed", "sh2_deepspeed_stage_1", "sh2_deepspeed_stage_2",
            "sh2_deepspeed_stage_3"} <= set(StrategyRegistry)
    strategy = StrategyRegistry.get("sh2_cp")
    assert isinstance(strategy, ContextParallelStrategy) and strategy.cp_config.size == "auto"
    assert StrategyRegistry.get("sh2_cp").cp_config is not strategy.cp_config  # no config shared between runs
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            strategies.ContextParallelDeepSpeedStrategy(cp={"size": 2})


def test_deepspeed_logging_batch_size_is_the_micro_batch_of_the_data_layout() -> None:
    # Lightning's own rule reads train_dataloader.batch_sampler.batch_size, which is None for sh2's streaming
    # loaders (an AttributeError in ZeRO-3's configure_model when the CLI passes logging_batch_size_per_gpu="auto")
    from types import SimpleNamespace

    from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy  # importable without deepspeed

    pick = ContextParallelDeepSpeedStrategy._auto_select_batch_size
    assert pick(SimpleNamespace(_data_layout=DataLayout(seq_len=64, micro_batch_size=3))) == 3


def test_deepspeed_zero3_registers_the_parameters_mixers_read_outside_their_forward() -> None:
    pytest.importorskip("deepspeed")
    from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy

    # ZeRO-3 chosen by argument or by a DeepSpeed config (Lightning builds the model under zero.Init either way)
    assert ContextParallelDeepSpeedStrategy(stage=3).builds_partitioned_model
    assert ContextParallelDeepSpeedStrategy(config={"zero_optimization": {"stage": 3}}).builds_partitioned_model
    assert not ContextParallelDeepSpeedStrategy(stage=2).builds_partitioned_model
    for tied in (True, False):
        model = SH2Model(SH2Config.from_name("tiny", tie_embeddings=tied))
        ContextParallelDeepSpeedStrategy(cp={"size": 1}, stage=3).parallelize_model(model)
        for block in model.blocks:
            filt = getattr(block.mixer, "filter", None)
            if filt is not None:
                registered = set(getattr(block.mixer, "_external_params", {}))  # id(param) -> param
                assert {id(p) for p in filt.parameters()} <= registered, type(block.mixer).__name__
        head = model.embedding.weight if tied else model.lm_head.weight  # read by SH2Model.head directly
        assert id(head) in getattr(model, "_external_params", {})
