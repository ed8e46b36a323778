"""The sh2 command end to end (subprocesses, as a user runs it) and every config file in configs/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sh2.cli import SH2CLI
from sh2.data.datamodule import SH2DataModule
from sh2.models import SH2Config
from sh2.training.module import SH2LightningModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
FAST = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.seq_len", "64",
        "--data.val_batches", "2", "--trainer.limit_val_batches", "2"]


def run_sh2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sh2", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


class _ParseOnly(SH2CLI):
    def instantiate_classes(self) -> None:  # parse and validate types, build nothing (GPU configs on CPU)
        pass


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_file_parses(path):
    cli = _ParseOnly(SH2LightningModule, SH2DataModule, run=False, args=["--config", str(path)])
    model = cli.config["model"]
    SH2Config.from_name(model["preset"], **(model["overrides"] or {}))  # the model section is a valid model
    assert cli.config["data"]["seq_len"] >= 2
    # GPU configs compile their blocks (measured faster, docs/benchmarks.md); the CPU configs stay eager
    assert model["compile"] == (cli.config["trainer"]["accelerator"] == "gpu"), "model.compile"


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "evo2_1b_8k.yaml", "evo2_7b_8k.yaml", "evo2_40b_8k.yaml", "finetune.yaml"} <= names


@pytest.mark.slow
def test_fit_then_validate_then_finetune_from_checkpoint(tmp_path):
    logs = tmp_path / "runs"
    res = run_sh2("fit", "--config", str(ROOT / "configs/tiny.yaml"), *FAST,
                  "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[sh2] step 4: val/loss" in res.stdout and "unigram entropy" in res.stdout
    version = logs / "tiny" / "version_0"
    assert list(version.glob("events.out.tfevents.*")), "TensorBoard events written"
    assert (version / "config.yaml").exists(), "resolved config saved next to the logs"
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["data"]["seq_len"] == 64 and "seq_len" not in saved["model"]  # set once, linked to the model
    last = version / "checkpoints" / "last.ckpt"
    assert last.exists()

    res = run_sh2("validate", "--config", str(ROOT / "configs/tiny.yaml"), "--data.seq_len", "64",
                  "--data.val_batches", "2", "--ckpt_path", str(last),
                  "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[sh2] step 4: val/loss" in res.stdout  # the checkpoint's step, not the validate loop's 0

    res = run_sh2("fit", "--config", str(ROOT / "configs/finetune.yaml"), *FAST, "--model.init_from", str(last),
                  "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


def test_print_config_shows_linked_values(tmp_path):
    res = run_sh2("fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.seq_len", "96", "--print_config",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["data"]["seq_len"] == 96 and cfg["model"]["preset"] == "tiny"
    assert "seq_len" not in cfg["model"]  # linked from data.seq_len


@pytest.mark.parametrize("extra,needle", [
    (["--data.path", "/no/such/genomes.fasta"], "/no/such/genomes.fasta"),
    (["--data.seq_len", "1"], "seq_len"),
    (["--model.preset", "evo9"], "unknown preset 'evo9'"),
    (["--model.overrides", "{se_groups: 7}"], "SH2Config.se_groups"),
])
def test_bad_input_fails_before_training_with_a_clear_message(tmp_path, extra, needle):
    res = run_sh2("fit", "--config", str(ROOT / "configs/tiny.yaml"), *FAST, *extra,
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr + res.stdout
    assert "Epoch 0:" not in res.stderr  # failed before the first training step


def test_unknown_yaml_field_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/tiny.yaml").read_text().replace("  lr: 3.0e-3", "  lr: 3.0e-3\n  lrr: 1.0"))
    res = run_sh2("fit", "--config", str(bad), cwd=tmp_path)
    assert res.returncode != 0
    assert "lrr" in res.stderr


@pytest.mark.slow
def test_predict_scores_and_generates_from_a_trained_checkpoint(tmp_path):
    logs = tmp_path / "runs"
    res = run_sh2("fit", "--config", str(ROOT / "configs/tiny.yaml"), *FAST, "--trainer.max_steps", "2",
                  "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = logs / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">a\nACGTACGTAC\n>b\nGGGCCCAAATTT\n>c\nacgtn\n")
    out = tmp_path / "scores.jsonl"
    res = run_sh2("predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.init_from", str(ckpt),
                  "--prediction.path", str(fasta), "--prediction.output", str(out), "--prediction.per_token", "true",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert [r["length"] for r in records] == [10, 12, 5]
    for r in records:
        assert r["logprob_sum"] < 0 and len(r["token_logprobs"]) == r["length"] - 1  # no BOS: first token unscored
    gen = tmp_path / "gen.jsonl"
    res = run_sh2("predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.init_from", str(ckpt),
                  "--prediction.path", str(fasta), "--prediction.output", str(gen), "--prediction.task", "generate",
                  "--prediction.max_new_tokens", "8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (json.loads(line) for line in gen.read_text().splitlines()):
        assert len(r["generated"]) == 8 and set(r["generated"]) <= set("ACGT")


def _tiny_weights(path: Path, **overrides) -> Path:
    """An sh2 state dict of the ``tiny`` preset (what configs/predict.yaml and finetune.yaml build)."""
    import torch

    from sh2.models import SH2Model

    torch.manual_seed(0)
    torch.save(SH2Model(SH2Config.from_name("tiny", **overrides)).state_dict(), path)
    return path


def test_predict_without_a_logger_leaves_config_yaml_in_the_working_directory_alone(tmp_path):
    # configs/predict.yaml has no logger: Lightning's log_dir is then the working directory, where writing the
    # resolved config would replace the user's own config.yaml.
    weights = _tiny_weights(tmp_path / "tiny.pt")
    mine = tmp_path / "config.yaml"
    mine.write_text("# my own config\nmodel: {preset: tiny}\n")
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">a\nACGTACGTAC\n>b\nGGGC\n")
    res = run_sh2("predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.init_from", str(weights),
                  "--prediction.path", str(fasta), "--prediction.output", str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert mine.read_text() == "# my own config\nmodel: {preset: tiny}\n"


@pytest.mark.parametrize("case", ["missing", "other_width"])
def test_bad_init_from_names_the_setting_and_keeps_the_checkpoint(tmp_path, case):
    if case == "missing":
        weights, needle = tmp_path / "no_such.ckpt", "does not exist"
    else:
        weights, needle = _tiny_weights(tmp_path / "wide.pt", hidden_size=256, num_heads=4), "shape mismatch"
    before = weights.read_bytes() if weights.exists() else None
    res = run_sh2("fit", "--config", str(ROOT / "configs/finetune.yaml"), *FAST, "--model.init_from", str(weights),
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode != 0
    out = res.stderr + res.stdout
    assert f"model.init_from={str(weights)!r}" in out and needle in out, out[-3000:]
    assert "Fix: point model.init_from" in out
    assert "Epoch 0:" not in res.stderr  # failed before the first training step
    assert (weights.read_bytes() if weights.exists() else None) == before


def test_prediction_settings_are_named_in_errors():
    from sh2.inference.predict import PredictDataModule

    with pytest.raises(ValueError, match=r"prediction\.task must be one of"):
        PredictDataModule(task="scroe")
    with pytest.raises(ValueError, match=r"prediction\.batch_size must be >= 1"):
        PredictDataModule(batch_size=0)


def test_predict_yaml_in_docs_parses(tmp_path):
    text = (ROOT / "docs/evo2.md").read_text()
    block = text.split("# predict_evo2_7b.yaml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "predict_evo2_7b.yaml"
    cfg.write_text(block)
    cli = _ParseOnly(SH2LightningModule, SH2DataModule, run=False, args=["--config", str(cfg)])
    assert cli.config["prediction"]["path"] == "my_sequences.fasta"
    assert cli.config["model"]["init_from"] == "weights/evo2_7b/evo2_7b.pt"


@pytest.mark.parametrize("extra,needle", [
    (["--trainer.strategy.init_args.context_parallel_size", "2"],
     "strategy 'context_parallel_size' moved: use cp: {size: ...} (trainer.strategy.init_args.cp.size"),
    (["--trainer.strategy.init_args.attention_scheme", "ring"],
     "strategy 'attention_scheme' moved: use cp: {attention_scheme: ...}"),
    (["--model.log_every_n_steps", "5"], "model 'log_every_n_steps' moved: use trainer.log_every_n_steps"),
])
def test_moved_settings_are_refused_naming_the_new_key(extra, needle, capsys):
    with pytest.raises(SystemExit):
        _ParseOnly(SH2LightningModule, SH2DataModule, run=False,
                   args=["--config", str(ROOT / "configs/tiny_cp.yaml"), *extra])
    assert needle in capsys.readouterr().err


def test_a_config_file_with_the_flat_cp_keys_is_refused_naming_the_new_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    new = "      cp:\n        size: 2\n        li_scheme: state"
    text = (ROOT / "configs/tiny_cp.yaml").read_text()
    assert new in text  # the flat keys below replace exactly this block
    old.write_text(text.replace(new, "      context_parallel_size: 2\n      li_scheme: state\n      cp:"))
    with pytest.raises(SystemExit):
        _ParseOnly(SH2LightningModule, SH2DataModule, run=False, args=["--config", str(old)])
    assert "strategy 'context_parallel_size' moved: use cp: {size: ...}" in capsys.readouterr().err


def test_cp_settings_nest_under_cp_and_the_reports_are_default_callbacks():
    from sh2.strategies import ContextParallelStrategy, CPConfig
    from sh2.training.callbacks import MemoryReport, ThroughputReport, ValidationReport

    cli = SH2CLI(SH2LightningModule, SH2DataModule, run=False,
                 args=["--config", str(ROOT / "configs/tiny_cp.yaml"), "--trainer.logger", "false",
                       "--trainer.strategy.init_args.cp.li_scheme", "p2p_fft"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ContextParallelStrategy)
    assert strategy.cp_config == CPConfig(size=2, li_scheme="p2p_fft")
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {ThroughputReport, MemoryReport, ValidationReport} <= kinds


def test_registered_strategy_names_still_work():
    from sh2.strategies import ContextParallelStrategy

    cli = SH2CLI(SH2LightningModule, SH2DataModule, run=False,
                 args=["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.logger", "false",
                       "--trainer.strategy", "sh2_cp"])
    assert isinstance(cli.trainer.strategy, ContextParallelStrategy)
    assert cli.trainer.strategy.cp_config.size == "auto"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        for name in ("sh2_cp_deepspeed", "sh2_deepspeed_stage_1", "sh2_deepspeed_stage_2", "sh2_deepspeed_stage_3"):
            with pytest.raises(ImportError, match="pip install 'sh2\\[deepspeed\\]'"):
                SH2CLI(SH2LightningModule, SH2DataModule, run=False,
                       args=["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.logger", "false",
                             "--trainer.strategy", name])


def test_a_checkpoint_with_the_old_module_hyperparameters_still_validates(tmp_path):
    # single-file checkpoints written before the throughput interval moved carry model.log_every_n_steps;
    # Lightning parses a --ckpt_path file's hyper-parameters into the model's settings
    import torch

    cli = SH2CLI(SH2LightningModule, SH2DataModule, run=False, save_config_callback=None,
                 args=["--config", str(ROOT / "configs/tiny.yaml"), "--data.seq_len", "64", "--data.val_batches", "1",
                       "--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
                       "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path)])
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = tmp_path / "old.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["log_every_n_steps"] = 10
    torch.save(state, ckpt)
    SH2CLI(SH2LightningModule, SH2DataModule, save_config_callback=None,
           args=["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--data.seq_len", "64",
                 "--data.val_batches", "1", "--trainer.logger", "false", "--trainer.limit_val_batches", "1",
                 "--ckpt_path", str(ckpt)])
