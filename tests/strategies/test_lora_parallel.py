"""LoRA with the transforms applied from outside: activation checkpointing and compiled blocks give the eager
gradients; under the context-parallel strategy (FSDP2 shards, CP = 2) the same losses and adapters as one process,
frozen shards that do not move, adapters gathered into adapters.safetensors, a sharded checkpoint that reads as
merged weights and resumes; with bf16 FSDP2 and activation checkpointing too.

sh2's real module trains here (``SH2LightningModule`` with ``lora``): the adapters are added in ``configure_model``
after the weights exist and before the strategy shards the model; the reference is the same module's model,
optimizer and schedule in a plain single-process loop.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from cp_harness import run_distributed
from test_cp_strategy import CONFIG, _Batches, make_batches

from sh2.checkpoints import load_pretrained
from sh2.checkpoints.adapters import read_adapters
from sh2.models import SH2Model
from sh2.models.config import SH2Config
from sh2.models.lora import LoRAConfig
from sh2.strategies import ContextParallelStrategy, apply_activation_checkpointing, apply_compile
from sh2.training.finetune import apply_finetuning, full_adapters
from sh2.training.module import SH2LightningModule

STEPS = 3
LORA = {"rank": 4, "alpha": 8, "targets": ["in_proj", "out_proj", "qkv", "w1", "w2", "w3"]}


def make_module(**kw) -> SH2LightningModule:
    torch.manual_seed(0)  # the base weights and the adapters' A are drawn when the model is built
    return SH2LightningModule(preset="tiny", overrides=CONFIG, seq_len=32, lr=1e-2, warmup_steps=0, decay_steps=10,
                              weight_decay=0.0, grad_clip=0.0, lora=LORA, **kw)


def reference(batches: list[dict[str, torch.Tensor]]) -> tuple[list[float], SH2LightningModule]:
    """The module's model, AdamW and schedule in a single-process loop."""
    module = make_module()
    module.configure_model()
    opt_config = module.configure_optimizers()
    opt, sched = opt_config["optimizer"], opt_config["lr_scheduler"]["scheduler"]
    losses = []
    for batch in batches:
        _, loss_sum, weight_sum = module._loss_terms(batch)
        loss = loss_sum / weight_sum.clamp_min(1.0)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return losses, module


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _trainer(strategy: ContextParallelStrategy, root: str, callbacks=(), steps: int = STEPS) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, default_root_dir=root, callbacks=list(callbacks))


def _job(rank: int, world: int, root: str) -> None:
    from torch.distributed.tensor import DTensor

    batches = make_batches()
    expected, ref = reference(batches)
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=2, shuffle=False)
    initial = {n: p.detach().clone() for n, p in make_module_built().model.named_parameters()}

    module, losses = make_module(), Losses()
    trainer = _trainer(ContextParallelStrategy(cp={"size": 2}), root, [losses])
    trainer.fit(module, loader)
    errs = [abs(a - b) / abs(b) for a, b in zip(losses.losses, expected)]
    assert len(errs) == STEPS and max(errs) < 1e-5, (losses.losses, expected)
    params = dict(module.model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())  # sharded by FSDP2, adapters included
    full = {n: p.detach().full_tensor() for n, p in params.items()}
    for name, value in full.items():
        if name.endswith(("lora_A", "lora_B")):  # the adapters of the single-process loop, to fp32 rounding
            torch.testing.assert_close(value, ref.model.get_parameter(name).detach(), rtol=1e-4, atol=1e-6)
        else:  # every frozen shard is exactly the initial weight
            assert torch.equal(value, initial[name]) and not params[name].requires_grad, name
    gathered = full_adapters(module.model)  # a collective: every rank gathers, rank 0 writes
    assert set(gathered) == {n for n in full if n.endswith(("lora_A", "lora_B"))}

    # a sharded checkpoint: adapters.safetensors beside it, and the folder reads back as merged weights
    ckpt = os.path.join(root, "lora.ckpt")
    trainer.save_checkpoint(ckpt)
    if rank == 0:
        tensors, lora, _, meta = read_adapters(Path(root) / "adapters.safetensors")
        assert lora.rank == 4 and meta["step"] == str(STEPS)
        assert all(torch.equal(tensors[n], gathered[n]) for n in gathered)
        config, merged = load_pretrained(ckpt)
        plain = SH2Model(config)
        plain.load_state_dict(merged)
        ids = batches[0]["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(plain(ids), ref.model(ids), rtol=1e-4, atol=1e-4)
    trainer.strategy.barrier()

    # resume the sharded LoRA checkpoint for one more step
    resumed = _trainer(ContextParallelStrategy(cp={"size": 2}), root, steps=STEPS + 1)
    resumed.fit(make_module(), torch.utils.data.DataLoader(_Batches(make_batches(n=STEPS + 1)), batch_size=2),
                ckpt_path=ckpt)
    assert resumed.global_step == STEPS + 1

    # bf16 FSDP2 with activation checkpointing: the adapters train through recomputed blocks, close to fp32
    module, losses = make_module(activation_checkpointing=True), Losses()
    _trainer(ContextParallelStrategy(cp={"size": 2}, mixed_precision="bf16"), root, [losses]).fit(module, loader)
    assert max(abs(a - b) / b for a, b in zip(losses.losses, expected)) < 1e-2, (losses.losses, expected)

    # built on the meta device (no init_from): the strategy materialises the shards and init_weights draws the
    # adapters too, A from Kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)) and B zero
    start = AtStart()
    _trainer(ContextParallelStrategy(cp={"size": 2}, meta_init=True), root, [start], steps=1).fit(make_module(),
                                                                                                loader)
    bound = 1 / CONFIG["hidden_size"] ** 0.5
    for name, value in start.adapters.items():
        if name.endswith("lora_B"):
            assert not value.any(), name
        elif name.endswith("mlp.w1.lora_A"):
            assert value.abs().max() <= bound and value.std() > bound / 4, name


class AtStart(L.Callback):
    """The whole adapters as training starts (gathered from the FSDP2 shards on every rank)."""

    def on_train_start(self, trainer, pl_module):
        self.adapters = full_adapters(pl_module.model)


def make_module_built() -> SH2LightningModule:
    module = make_module()
    module.configure_model()
    return module


def test_lora_under_fsdp2_and_context_parallelism_matches_one_process() -> None:
    with tempfile.TemporaryDirectory() as root:
        run_distributed(_job, 2, root, lightning_env=True)


def test_lora_composes_with_activation_checkpointing_and_compiled_blocks() -> None:
    torch.manual_seed(0)
    eager = SH2Model(SH2Config(**CONFIG))
    apply_finetuning(eager, LoRAConfig.coerce(LORA), None)
    with torch.no_grad():  # trained adapters, so that both A and B receive gradients
        for name, p in eager.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    model = copy.deepcopy(eager)
    apply_activation_checkpointing(model)
    apply_compile(model, backend="aot_eager")  # dynamo traces the checkpointed block with its LoRA layers
    assert list(model.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(m: SH2Model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad()
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(eager)
    loss, grads = loss_and_grads(model)
    assert set(grads) == set(ref_grads) == {n for n, _ in eager.named_parameters() if "lora_" in n}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():  # compiled graphs may reorder fp32 sums: rounding only
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
