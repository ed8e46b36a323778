"""The sh2 command as a new user meets it: one short message for every bad input, nothing changed by a failed
command, no silent random weights, no silently dropped flag on a resume, and a readable CLI.

Most commands run in this process (``sh2.cli.main``, no interpreter start-up); a few run as subprocesses where
the process itself is the subject (exit code, traceback, warnings printed). One small run made by the real command
(``trained``, a 4-layer model, 2 steps) provides the checkpoint the resume, validate and predict tests use.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OVERRIDES

from sh2.cli import expand_strategy_alias, main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["--model.overrides", json.dumps(TINY_OVERRIDES), "--data.seq_len", "32", "--data.batch_size", "2",
         "--data.val_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def sh2(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``sh2 ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def run_process(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sh2", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (a failed command must leave them all as they were)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _as_a_command(monkeypatch):
    monkeypatch.delenv("SH2_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["sh2"])  # main(args) is the whole command line


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-step run of the real command: its folder, checkpoint and console output."""
    root = tmp_path_factory.mktemp("trained")
    res = run_process("fit", "--config", TINY, *SMALL, "--trainer.max_steps", "2",
                      "--trainer.logger.init_args.save_dir", str(root / "runs"), cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / "runs" / "tiny" / "version_0"
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "out": res.stdout, "err": res.stderr}


# ----------------------------------------------------------------------------- the run itself
def test_a_run_prints_its_folder_and_weights_and_no_noise(trained):
    assert f"[sh2] run folder: {Path('runs/tiny/version_0')}" in trained["out"].replace(str(trained["root"]) + "/", "")
    assert "[sh2] weights: random initialisation" in trained["out"]
    both = trained["out"] + trained["err"]
    for noise in ("Tip:", "LeafSpec", "TPU available", "Traceback"):
        assert noise not in both
    assert (trained["run"] / "config.yaml").is_file() and trained["ckpt"].is_file()


def test_validation_is_logged_at_the_step_the_console_names(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["run"]), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("val/loss")]
    assert steps == [2] and "[sh2] step 2: val/loss" in trained["out"]


# ----------------------------------------------------------------------------- errors: one short message
@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_broken_ckpt_path_is_named_before_lightning_reads_it(trained, tmp_path, capsys, damage):
    bad = tmp_path / "last.ckpt"
    whole = trained["ckpt"].read_bytes()
    if damage == "truncated":
        bad.write_bytes(whole[: len(whole) // 3])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # bytes that are neither a zip archive (PK) nor a pickle (0x80) at the start
        bad.write_bytes(b"\x00\x01" + os.urandom(3000))
    for command in ("fit", "validate"):
        code, out, err = sh2(capsys, command, "--config", TINY, *SMALL, "--ckpt_path", str(bad),
                             "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
        assert code == 1 and "--ckpt_path: " in err and str(bad) in err and "Fix:" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage,needle", [
    ("truncated", "is truncated or corrupt"),
    ("not_gzip", "is named .gz but is not gzip data"),
])
def test_damaged_data_files_are_named_and_leave_no_run_folder(tmp_path, capsys, damage, needle):
    data = tmp_path / "genomes.fasta.gz"
    rng = random.Random(0)
    records = "".join(f">r{i}\n{''.join(rng.choices('ACGT', k=200))}\n" for i in range(300)).encode()
    packed = gzip.compress(records)
    data.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else records)
    code, _, err = sh2(capsys, "fit", "--config", TINY, *SMALL, "--trainer.max_steps", "2", "--data.path", str(data),
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 1 and str(data) in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # the run folder this command made is gone again


@pytest.mark.parametrize("content,needle", [
    ("model:\n  preset: tiny\n", "is not a PyTorch checkpoint (a text file"),
    ("", "is empty (0 bytes)"),
])
def test_init_from_a_file_that_is_no_checkpoint_says_so_without_trust_pickle_advice(tmp_path, capsys, content,
                                                                                    needle):
    weights = tmp_path / "weights.yaml"
    weights.write_text(content)
    fasta = tmp_path / "s.fa"
    fasta.write_text(">a\nACGT\n")
    code, _, err = sh2(capsys, "predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.init_from",
                       str(weights), "--prediction.path", str(fasta), "--prediction.output",
                       str(tmp_path / "o.jsonl"))
    assert code == 1 and needle in err and f"model.init_from={str(weights)!r}" in err
    assert "trust_pickle" not in err and "Traceback" not in err


def test_the_traceback_is_shown_only_with_the_debug_switch(tmp_path):
    args = ["fit", "--config", TINY, "--data.path", str(tmp_path / "missing.fa"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    plain = run_process(*args, cwd=tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.rstrip().endswith("(add --debug (or set SH2_DEBUG=1) to see the traceback)")
    assert "data.path=" in plain.stderr and "missing.fa" in plain.stderr
    debug = run_process(*args, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_a_parser_error_is_short_and_points_at_help(capsys):
    code, out, err = sh2(capsys, "fit", "--config", TINY, "--model.zzz", "3")
    assert code == 2 and out == ""
    assert err.splitlines() == ["sh2 fit: error: unrecognized arguments: --model.zzz 3",
                                "See `sh2 fit --help` for sh2's settings, `sh2 fit --help-all` for every setting."]


@pytest.mark.parametrize("args,suggestion", [
    (["--model.lrr", "3"], "Did you mean --model.lr?"),
    (["--data.batchsize", "2"], "Did you mean --data.batch_size"),
    (["--batch_size", "2"], "Did you mean --data.batch_size"),  # without its section
    (["--model.batch_size", "2"], "Did you mean --data.batch_size"),  # in the wrong section
    (["--trainer.max_step", "3"], "Did you mean --trainer.max_steps"),  # a prefix is not taken as the setting
])
def test_a_mistyped_setting_gets_the_closest_names(capsys, tmp_path, args, suggestion):
    code, out, err = sh2(capsys, "fit", "--config", TINY, *args)
    assert code == 2 and suggestion in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,expanded", [
    (["--trainer.strategy", "sh2_cp", "--trainer.strategy.cp.size", "2"],
     ["--trainer.strategy", '{"class_path": "sh2.strategies.ContextParallelStrategy", "init_args": {"cp": '
      '{"size": "auto"}}}', "--trainer.strategy.cp.size", "2"]),
    (["--trainer.strategy=sh2_deepspeed_stage_3", "--trainer.strategy.cp.size", "2"],
     ['--trainer.strategy={"class_path": "sh2.strategies.deepspeed.ContextParallelDeepSpeedStrategy", '
      '"init_args": {"cp": {"size": 1}, "stage": 3}}', "--trainer.strategy.cp.size", "2"]),
    (["--trainer.strategy", "sh2_cp"], ["--trainer.strategy", "sh2_cp"]),  # no settings: the name stays
    (["--trainer.strategy", "ddp", "--trainer.strategy.x", "1"], ["--trainer.strategy", "ddp", "--trainer.strategy.x",
                                                                 "1"]),  # not sh2's: left to the parser
])
def test_a_strategy_name_followed_by_its_settings_becomes_its_class(argv, expanded):
    assert expand_strategy_alias(argv) == expanded


def test_settings_after_a_strategy_name_reach_the_strategy(capsys):
    code, _, err = sh2(capsys, "fit", "--config", TINY, "--trainer.strategy", "sh2_cp", "--trainer.strategy.cp.size",
                       "2")
    assert code != 0 and "not divisible by cp.size=2" in err, err


def test_a_strategy_name_in_a_config_with_settings_on_the_command_line_says_how_to_write_it(capsys, tmp_path):
    alias = tmp_path / "alias.yaml"
    alias.write_text("trainer:\n  strategy: sh2_cp\n")
    code, _, err = sh2(capsys, "fit", "--config", TINY, "--config", str(alias), "--trainer.strategy.cp.size", "2")
    assert code == 2 and "the name sh2_cp takes no settings such as cp.size" in err, err
    assert "class_path: sh2.strategies.ContextParallelStrategy" in err and "NestedArg" not in err


def test_a_mistyped_key_in_a_config_file_gets_the_closest_names(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  warmup_step: 3\n")
    code, _, err = sh2(capsys, "fit", "--config", TINY, "--config", str(bad))
    assert code == 2 and "'model.warmup_step'" in err and "Did you mean model.warmup_steps?" in err, err


# ----------------------------------------------------------------------------- one name per setting
@pytest.mark.parametrize("command,args,needle", [
    ("fit", ["--trainer.gradient_clip_val", "0.5"], "trainer.gradient_clip_val=0.5 is not an sh2 setting: set "
                                                    "model.grad_clip"),
    ("fit", ["--trainer.gradient_clip_algorithm", "value"], "sh2 clips the gradient norm (model.grad_clip)"),
    ("fit", ["--throughput.log_every_n_steps", "5"], "throughput is sampled every trainer.log_every_n_steps"),
    ("predict", ["--prediction.seed", "3"], "sampling is seeded by seed_everything"),
])
def test_duplicate_settings_are_refused_naming_the_one_to_use(capsys, command, args, needle):
    code, _, err = sh2(capsys, command, "--config", TINY, *args)
    assert code != 0 and needle in err and "Traceback" not in err


def test_sh2_clips_with_model_grad_clip_and_hands_it_to_the_trainer():
    from sh2.cli import SH2CLI
    from sh2.data.datamodule import SH2DataModule
    from sh2.training.module import SH2LightningModule

    cli = SH2CLI(SH2LightningModule, SH2DataModule, run=False, save_config_callback=None,
                 args=["--config", TINY, "--model.grad_clip", "0.25", "--trainer.logger", "false"])
    assert cli.trainer.gradient_clip_val == 0.25  # what DeepSpeed reads; configure_gradient_clipping agrees


# ----------------------------------------------------------------------------- no silent random weights
@pytest.mark.parametrize("command,config,needle", [
    ("predict", "predict.yaml", "sh2 predict has no weights"),
    ("validate", "tiny.yaml", "sh2 validate has no weights"),
    ("test", "tiny.yaml", "sh2 test has no weights"),
    ("fit", "finetune.yaml", "model.init_from is not set, and this config sets model.allow_random_init: false"),
    ("fit", "finetune_lora.yaml", "model.init_from is not set, and this config sets model.allow_random_init: false"),
])
def test_commands_that_need_weights_refuse_to_run_without_them(tmp_path, monkeypatch, capsys, command, config,
                                                              needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = sh2(capsys, command, "--config", str(ROOT / "configs" / config))
    assert code == 1 and needle in err and "--model.allow_random_init true" in err
    assert list(tmp_path.iterdir()) == []  # refused before any folder or file was made


def test_random_weights_on_request(tmp_path, capsys):
    fasta = tmp_path / "s.fa"
    fasta.write_text(">a\nACGTAC\n")
    out = tmp_path / "scores.jsonl"
    code, stdout, err = sh2(capsys, "predict", "--config", str(ROOT / "configs/predict.yaml"),
                            "--model.allow_random_init", "true", "--prediction.path", str(fasta),
                            "--prediction.output", str(out), "--trainer.enable_progress_bar", "false")
    assert code == 0, err
    assert "[sh2] weights: random initialisation" in stdout and f"records written to {out}" in stdout
    assert json.loads(out.read_text())["id"] == "a"


# ----------------------------------------------------------------------------- nothing changed by a failure
def test_a_refused_prediction_leaves_the_existing_output_byte_for_byte(trained, tmp_path, capsys):
    fasta = tmp_path / "s.fa"
    fasta.write_text(">a\nACGTAC\n")
    out = tmp_path / "generated.jsonl"
    out.write_text('{"id": "from an earlier run"}\n')
    before = files_of(tmp_path)
    code, _, err = sh2(capsys, "predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.overrides",
                       json.dumps(TINY_OVERRIDES), "--model.init_from", str(trained["ckpt"]), "--prediction.path",
                       str(fasta), "--prediction.output", str(out), "--prediction.task", "generate",
                       "--prediction.max_new_tokens", "-5")
    assert code == 1 and "prediction.max_new_tokens must be >= 1, got -5" in err and "Traceback" not in err
    assert files_of(tmp_path) == before


def test_a_refused_resume_into_its_own_folder_leaves_every_file_byte_for_byte(trained, capsys):
    before = files_of(trained["run"])
    code, _, err = sh2(capsys, "fit", "--config", TINY, *SMALL, "--trainer.max_steps", "3", "--data.batch_size", "4",
                       "--ckpt_path", str(trained["ckpt"]), "--trainer.logger.init_args.version", "0",
                       "--trainer.logger.init_args.save_dir", str(trained["root"] / "runs"))
    assert code == 1 and "data.batch_size: checkpoint 2, this run 4" in err
    assert f"run with its config ({trained['run'] / 'config.yaml'})" in err
    assert files_of(trained["run"]) == before


# ----------------------------------------------------------------------------- resume: conflicts and changes
def test_a_resume_with_another_architecture_lists_every_conflict(trained, tmp_path, capsys):
    wider = {**TINY_OVERRIDES, "hidden_size": 64}
    code, _, err = sh2(capsys, "fit", "--config", TINY, *SMALL, "--model.overrides", json.dumps(wider),
                       "--data.seq_len", "48", "--ckpt_path", str(trained["ckpt"]),
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 1 and "does not fit this run's settings" in err, err
    assert "architecture: hidden_size 32 -> 64" in err and "data.seq_len: checkpoint 32, this run 48" in err
    assert f"--model.init_from {trained['ckpt']}" in err
    assert not (tmp_path / "runs").exists()


def test_resuming_a_finished_run_is_refused_with_the_step_to_raise(trained, tmp_path, capsys):
    code, _, err = sh2(capsys, "fit", "--config", TINY, *SMALL, "--trainer.max_steps", "2", "--ckpt_path",
                       str(trained["ckpt"]), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 1 and "is at step 2, and trainer.max_steps=2: the run is finished" in err, err
    assert "raise --trainer.max_steps above 2" in err and not (tmp_path / "runs").exists()


def test_a_whole_number_batch_limit_is_a_count_of_batches(tmp_path):
    from sh2.cli import _batch_limits_as_counts

    cfg = {"trainer": {"limit_val_batches": 1.0, "limit_train_batches": 0.5, "limit_test_batches": 16.0,
                       "limit_predict_batches": None}}
    _batch_limits_as_counts(cfg)  # the parser reads "--trainer.limit_val_batches 1" as 1.0 (100% to Lightning)
    assert cfg["trainer"] == {"limit_val_batches": 1, "limit_train_batches": 0.5, "limit_test_batches": 16,
                              "limit_predict_batches": None}
    assert isinstance(cfg["trainer"]["limit_val_batches"], int)


def test_a_resume_applies_changed_optimizer_settings_and_says_so(trained, tmp_path, capsys):
    stale = trained["ckpt"].parent / f".last.ckpt.tmp-{2**22 + 17}"  # a save killed by a process now gone
    stale.write_bytes(b"half a checkpoint")
    code, out, err = sh2(capsys, "fit", "--config", TINY, *SMALL, "--trainer.max_steps", "3", "--model.lr", "1e-3",
                         "--model.warmup_steps", "5", "--ckpt_path", str(trained["ckpt"]),
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert ("[sh2] resuming at step 2 with changed settings, applied to the restored optimizer and schedule: "
            "model.lr 0.003 -> 0.001, model.warmup_steps 20 -> 5") in out
    assert f"[sh2] removed {stale}" in out and not stale.exists()
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["lr"] == 1e-3


def test_validate_opens_no_run_folder(trained, tmp_path, capsys):
    code, out, err = sh2(capsys, "validate", "--config", TINY, *SMALL, "--ckpt_path", str(trained["ckpt"]),
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "[sh2] step 2: val/loss" in out and "run folder" not in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- a CLI that reads well
def test_version(capsys):
    from sh2 import __version__

    code, out, _ = sh2(capsys, "--version")
    assert code == 0 and out.startswith(f"sh2 {__version__} (torch ")


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_help_is_short_and_shows_sh2_settings_first(capsys, command):
    code, out, _ = sh2(capsys, command, "--help")
    assert code == 0 and len(out.splitlines()) < 110
    assert out.startswith(f"usage: sh2 {command}") and f"sh2 {command} --help-all" in out
    assert "--model.init_from" in out and "``" not in out and ":class:" not in out
    assert ("--prediction.task" in out) == (command == "predict")  # no options of other subcommands
    assert ("--data.path" in out) == (command != "predict")
    code, full, _ = sh2(capsys, command, "--help-all")
    assert code == 0 and len(full.splitlines()) > 400 and "--trainer.detect_anomaly" in full
    assert "``" not in full and ":class:" not in full


def test_an_error_from_a_dataloader_worker_is_reported_without_the_embedded_traceback():
    from torch._utils import ExceptionWrapper

    from sh2.cli import error_report
    from sh2.data.files import DataFileError

    try:
        raise DataFileError("gzip-compressed file x.fa.gz is truncated or corrupt (EOFError: ...); copy it again")
    except DataFileError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataFileError) as err:
        wrapped.reraise()  # what the main process sees: the worker's traceback is in the message
    assert "Traceback" in str(err.value)
    assert error_report(err.value, "fit").splitlines()[0] == (
        "sh2 fit: error: gzip-compressed file x.fa.gz is truncated or corrupt (EOFError: ...); copy it again")


def test_an_internal_error_is_reported_as_a_possible_bug_without_a_traceback():
    from sh2.cli import error_report

    report = error_report(AssertionError("shapes differ"), "fit")
    assert report.startswith("sh2 fit: error: AssertionError: shapes differ\nThis may be a bug")
    assert "--debug" in report


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_trainer_on_a_machine_without_one_names_the_trainer_settings(tmp_path, capsys):
    code, _, err = sh2(capsys, "fit", "--config", TINY, "--trainer.accelerator", "gpu",
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert code == 1 and "trainer.accelerator='gpu'" in err and "--trainer.accelerator cpu" in err


def test_no_subcommand_is_a_short_error(capsys):
    code, _, err = sh2(capsys)
    assert code == 2 and err.splitlines()[-1] == "See `sh2 --help`." and len(err.splitlines()) == 2
