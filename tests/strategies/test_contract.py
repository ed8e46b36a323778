"""The strategy contract and the one CP config: what sh2's module and datamodule get from every strategy.

Single process, no process group: the CP strategies are built but not set up, and Lightning's own strategies
are used as the trainer would hand them over.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from sh2.strategies import ContextParallelStrategy, CPConfig, strategy_contract
from sh2.strategies.contract import DataLayout, LightningStrategyAdapter, StrategyContract
from sh2.strategies.cp_attention import RingAttention, UlyssesAttention
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_conv import AllToAllConv, HaloConv, OverlappedHaloConv, PipelinedAllToAllConv
from sh2.strategies.cp_fft import P2PFFTConv
from sh2.strategies.cp_ops import (
    ATTENTION_SCHEMES,
    FEATURIZER_SCHEMES,
    FIR_SCHEMES,
    LI_SCHEMES,
    MOVED_STRATEGY_KEYS,
    CPSequenceOps,
)
from sh2.strategies.cp_state import StateConv

PAIR = CPGroup(group=None, rank=0, size=2, global_ranks=[0, 1])  # built, never communicated over


def test_cp_config_is_validated_once_and_names_the_field() -> None:
    assert CPConfig().size == 1 and CPConfig(size="auto").size == "auto"
    for bad in (0, -2, 1.5, True, "four"):
        with pytest.raises(ValueError, match="cp.size must be a positive integer or 'auto'"):
            CPConfig(size=bad)
    with pytest.raises(ValueError, match=r"cp.fir_scheme must be one of \('p2p', 'p2p_overlap', 'a2a', "
                                         r"'a2a_pipelined'\), got 'ring'"):
        CPConfig(fir_scheme="ring")
    with pytest.raises(ValueError, match="cp.ring_attention_backend must be one of"):
        CPConfig(ring_attention_backend="cudnn")
    with pytest.raises(ValueError, match="cp.a2a_pipeline_chunks must be a positive integer"):
        CPConfig(a2a_pipeline_chunks=0)


def test_cp_config_of_a_yaml_mapping() -> None:
    assert CPConfig.of(None) == CPConfig()
    cfg = CPConfig(size=4, li_scheme="p2p_fft")
    assert CPConfig.of(cfg) is cfg
    assert CPConfig.of({"size": 4, "li_scheme": "p2p_fft"}) == cfg
    with pytest.raises(ValueError, match="cp.context_parallel_size is not a context-parallel setting .the CP size "
                                         "is cp.size.; the settings are size, li_scheme"):
        CPConfig.of({"context_parallel_size": 4})
    with pytest.raises(ValueError, match="cp must be a mapping"):
        CPConfig.of(4)


@pytest.mark.parametrize("field,table,expected", [
    ("li_scheme", LI_SCHEMES, {"state": StateConv, "a2a": AllToAllConv, "a2a_pipelined": PipelinedAllToAllConv,
                               "p2p_fft": P2PFFTConv}),
    ("fir_scheme", FIR_SCHEMES, {"p2p": HaloConv, "p2p_overlap": OverlappedHaloConv, "a2a": AllToAllConv,
                                 "a2a_pipelined": PipelinedAllToAllConv}),
    ("featurizer_scheme", FEATURIZER_SCHEMES, {"p2p": HaloConv, "p2p_overlap": OverlappedHaloConv}),
    ("attention_scheme", ATTENTION_SCHEMES, {"a2a": UlyssesAttention, "ring": RingAttention}),
])
def test_every_scheme_name_builds_its_implementation(field, table, expected) -> None:
    attribute = {"li_scheme": "li_impl", "fir_scheme": "fir_impl", "featurizer_scheme": "featurizer",
                 "attention_scheme": "attn_impl"}[field]
    assert set(table) == set(expected)  # the names CPConfig accepts are the names that have an implementation
    for name, cls in expected.items():
        ops = CPSequenceOps(PAIR, CPConfig(**{field: name}, a2a_pipeline_chunks=3))
        impl = getattr(ops, attribute)
        assert type(impl) is cls, (name, type(impl))
        if cls is PipelinedAllToAllConv:
            assert impl.chunks == 3


@pytest.mark.parametrize("key", sorted(MOVED_STRATEGY_KEYS))
def test_flat_strategy_keys_are_refused_naming_the_cp_key(key) -> None:
    field = MOVED_STRATEGY_KEYS[key]
    with pytest.raises(ValueError, match=f"strategy '{key}' moved: use cp: {{{field}: 7}}"):
        ContextParallelStrategy(**{key: 7})
    with pytest.raises(TypeError, match="unexpected keyword argument 'tensor_parallel_size'"):
        ContextParallelStrategy(tensor_parallel_size=2)


def test_cp_strategies_are_their_own_contract() -> None:
    strategy = ContextParallelStrategy(cp={"size": 2}, mixed_precision="bf16", meta_init=True)
    assert strategy_contract(strategy) is strategy and isinstance(strategy, StrategyContract)
    assert strategy.context_parallel_size == 2 and strategy.meta_init and strategy.shards_parameters
    assert strategy.mixed_precision == "bf16" and not strategy.builds_partitioned_model
    strategy._set_cp_group(PAIR, 1, 3)
    assert (strategy.data_parallel_rank, strategy.data_parallel_size) == (1, 3)
    assert strategy.distributed_sampler_kwargs == {"rank": 1, "num_replicas": 3}
    layout = DataLayout(seq_len=64, micro_batch_size=2, per_rank_state_keys=("SH2DataModule",))
    strategy.set_data_layout(layout)
    checkpoint = {"loops": {}, "SH2DataModule": {}, "state_dict": {}}
    assert strategy._per_rank_keys(checkpoint) == ["loops", "SH2DataModule"]  # saved once per rank


def test_lightning_strategies_get_the_plain_contract() -> None:
    for strategy in (None, SingleDeviceStrategy(torch.device("cpu"))):
        plain = strategy_contract(strategy)
        assert isinstance(plain, LightningStrategyAdapter)
        assert (plain.data_parallel_rank, plain.data_parallel_size, plain.context_parallel_size) == (0, 1, 1)
        assert not (plain.meta_init or plain.builds_partitioned_model or plain.shards_parameters)
        assert plain.mixed_precision is None
    # DDP: the coordinate of Lightning's distributed sampler (every process is its own data stream)
    ddp = strategy_contract(DDPStrategy(parallel_devices=[torch.device("cpu")] * 4))
    assert (ddp.data_parallel_rank, ddp.data_parallel_size) == (0, 4)

    model = torch.nn.Linear(3, 2)
    assert ddp.parallelize_model(model) is model
    loss_sum, weight_sum = torch.tensor(6.0), torch.tensor(0.5)
    assert float(ddp.reduce_loss(loss_sum, weight_sum)) == 6.0  # total weight clamped to 1, as on one process
    assert float(ddp.reduce_loss(loss_sum, torch.tensor(3.0))) == 2.0

    model.weight.grad = torch.full((2, 3), 2.0)
    model.bias.grad = torch.full((2,), 2.0)
    norm = ddp.clip_gradients([model.weight, model.bias], 1.0)
    assert float(norm) == pytest.approx(2.0 * 8 ** 0.5)  # the norm before clipping: sqrt(8 entries * 2^2)
    clipped = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
