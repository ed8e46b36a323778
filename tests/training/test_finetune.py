"""LoRA and freezing in training runs: frozen parameters do not move, adapters train and the loss falls, only
trainable parameters reach the optimizer, adapter files beside checkpoints, exact resume, the CPU config runs."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import LossRecorder, make_data, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from sh2.checkpoints import load_pretrained
from sh2.checkpoints.adapters import load_adapters, read_adapters
from sh2.models import SH2Model
from sh2.models.freeze import parameter_roles
from sh2.models.lora import LoRAConfig, apply_lora

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[65, 67, 71, 84, 84, 65, 71, 67, 65, 65, 84, 71, 67, 65, 0, 71, 71, 67]])


class Snapshot(L.Callback):
    """The parameters as training starts (after the module built and adapted the model)."""

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A base model trained briefly on the phage genomes (the weights a finetune starts from)."""
    root = tmp_path_factory.mktemp("pretrained")
    L.seed_everything(0)
    trainer = make_trainer(root, 30)
    trainer.fit(make_module(lr=1e-2), make_data())
    trainer.save_checkpoint(root / "base.ckpt")
    return root / "base.ckpt"


def periodic_fasta(path: Path) -> Path:
    """Records that repeat one of three motifs: a new task that the phage-trained base model does not know."""
    rng = np.random.default_rng(0)
    motifs = ["AACGTTG", "GGATCCA", "TTAGGCAC"]
    path.write_text("".join(f">r{i}\n{(motifs[i % 3] * 100)[:int(rng.integers(300, 600))]}\n" for i in range(40)))
    return path


def held_out_loss(module, datamodule) -> float:
    """The weighted loss over the fixed validation batches (the same tokens before and after training)."""
    loss, weight = 0.0, 0.0
    with torch.no_grad():
        for batch in datamodule.val_batches_list():
            _, loss_sum, weight_sum = module._loss_terms(batch)
            loss, weight = loss + float(loss_sum), weight + float(weight_sum)
    return loss / weight


def test_lora_trains_the_adapters_only_and_the_loss_falls(tmp_path, pretrained):
    L.seed_everything(0)
    module = make_module(init_from=str(pretrained), lora={"rank": 4, "alpha": 8}, lr=1e-2, weight_decay=0.0)
    data = make_data(path=str(periodic_fasta(tmp_path / "periodic.fa")), val_fraction=0.2)
    module.configure_model()
    data.setup("fit")
    before = held_out_loss(module, data)
    snap = Snapshot()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=10)
    trainer = make_trainer(tmp_path, 30, [snap, checkpoints], enable_checkpointing=True)
    trainer.fit(module, data)
    model = module.model
    # the adapters learn the new task: the held-out loss falls (measured 1.35 -> 1.17 nats/token)
    after = held_out_loss(module, data)
    assert after < before - 0.1, (before, after)
    adapters = {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    # every pretrained weight is bit-identical after 30 AdamW steps; every adapter moved
    for name, p in model.named_parameters():
        if name in adapters:
            assert not torch.equal(p, snap.params[name]), name
        else:
            assert torch.equal(p, snap.params[name]) and not p.requires_grad, name
    assert snap.optimized == {id(p) for n, p in model.named_parameters() if n in adapters}
    # the base weights are those of the checkpoint the finetune started from
    _, base = load_pretrained(str(pretrained))
    assert all(torch.equal(snap.params[k], v) for k, v in base.items())

    # adapters.safetensors beside the checkpoints: the run's adapters, settings and config
    ckpt_dir = tmp_path / "ckpt"
    tensors, lora, config, meta = read_adapters(ckpt_dir / "adapters.safetensors")
    assert lora == LoRAConfig(rank=4, alpha=8) and config == module.config
    assert meta["base"] == str(pretrained) and meta["step"] == "30"
    assert set(tensors) == adapters and all(torch.equal(tensors[n], p) for n, p in model.named_parameters()
                                            if n in adapters)
    # base + adapter file = the finetuned model (same values, same logits)
    fresh = SH2Model(module.config).eval()
    fresh.load_state_dict(base)
    apply_lora(fresh, lora)
    load_adapters(fresh, ckpt_dir / "adapters.safetensors")
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))

    # the run's Lightning checkpoint read as weights (init_from, predict, export): adapters merged
    last = ckpt_dir / "last.ckpt"
    cfg, merged = load_pretrained(str(last))
    assert set(merged) == set(base)
    plain = SH2Model(cfg).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():  # fp32: W x + s B (A x) against (W + s B A) x
        torch.testing.assert_close(plain(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_frozen_groups_without_lora_stay_fixed_and_the_rest_trains(tmp_path, pretrained):
    L.seed_everything(0)
    module = make_module(init_from=str(pretrained), freeze=["embeddings", "mlp", "blocks.0"])
    snap = Snapshot()
    make_trainer(tmp_path, 3, [snap]).fit(module, make_data())
    roles = parameter_roles(module.model)
    for name, p in module.model.named_parameters():
        frozen = roles[name] in ("embeddings", "mlp") or name.startswith("blocks.0.")
        assert p.requires_grad != frozen, name
        if frozen:
            assert torch.equal(p, snap.params[name]), name
        elif name.endswith(("norm_in.scale", "qkv.weight", "in_proj.weight")):
            assert not torch.equal(p, snap.params[name]), name


def test_a_lora_run_resumes_bit_for_bit(tmp_path, pretrained):
    # (with lora.dropout > 0 a resumed run draws new dropout masks: Lightning checkpoints hold no RNG state)
    def module():
        return make_module(init_from=str(pretrained), lora={"rank": 4, "alpha": 4}, lr=3e-3)

    L.seed_everything(0)
    full = LossRecorder()
    make_trainer(tmp_path / "a", 8, [full]).fit(module(), make_data())
    L.seed_everything(0)
    first = LossRecorder()
    trainer = make_trainer(tmp_path / "b", 4, [first])
    trainer.fit(module(), make_data())
    trainer.save_checkpoint(tmp_path / "b" / "step4.ckpt")
    state = torch.load(tmp_path / "b" / "step4.ckpt", weights_only=True)  # no pickled sh2 class in it
    assert state["hyper_parameters"]["lora"] == LoRAConfig(rank=4, alpha=4).to_dict()
    L.seed_everything(123)
    second = LossRecorder()
    make_trainer(tmp_path / "c", 8, [second]).fit(module(), make_data(), ckpt_path=str(tmp_path / "b" / "step4.ckpt"))
    assert [first.losses[s] for s in range(1, 5)] == [full.losses[s] for s in range(1, 5)]
    assert [second.losses[s] for s in range(5, 9)] == [full.losses[s] for s in range(5, 9)]


def test_bad_finetune_settings_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="model.lora.rank must be a positive integer"):
        make_module(lora={"rank": 0})
    with pytest.raises(ValueError, match="model.lora.ranks is not a LoRA setting"):
        make_module(lora={"ranks": 4})
    with pytest.raises(ValueError, match="model.freeze must be a list"):
        make_module(freeze="mlp")
    with pytest.raises(ValueError, match="model.lora.targets: 'proj' matches no module"):
        make_trainer(tmp_path, 1).fit(make_module(lora={"targets": ["proj"]}), make_data())
    with pytest.raises(ValueError, match="freezes every parameter of the model"):
        make_trainer(tmp_path, 1).fit(make_module(freeze=["base"]), make_data())


def test_finetune_lora_config_runs_on_the_cpu(tmp_path, pretrained, capsys):
    from sh2.cli import SH2CLI
    from sh2.data.datamodule import SH2DataModule
    from sh2.training.module import SH2LightningModule

    # configs/finetune_lora.yaml adapts the tiny preset; start it from a tiny checkpoint of that architecture
    base = SH2LightningModule(preset="tiny")
    base.configure_model()
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.model.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "overrides": None, "vocab_size": 512}}, tmp_path / "tiny.ckpt")
    cli = SH2CLI(SH2LightningModule, SH2DataModule, save_config_callback=None,
                 args=["fit", "--config", str(ROOT / "configs/finetune_lora.yaml"), "--model.init_from",
                       str(tmp_path / "tiny.ckpt"), "--data.seq_len", "64", "--data.val_batches", "2",
                       "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                       "--trainer.limit_val_batches", "2", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    assert cli.model.lora == LoRAConfig(rank=8, alpha=16, targets=("in_proj", "out_proj", "qkv", "w1", "w2", "w3"))
    assert cli.trainer.global_step == 2
    assert (tmp_path / "ckpt" / "adapters.safetensors").is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    # validating the LoRA checkpoint with a config without LoRA: refused, and told how to read it as weights
    from sh2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(tmp_path / "ckpt" /
              "last.ckpt"), "--data.seq_len", "64", "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "model.lora: checkpoint" in err
    assert f"--model.init_from {tmp_path / 'ckpt' / 'last.ckpt'} instead of --ckpt_path" in err
