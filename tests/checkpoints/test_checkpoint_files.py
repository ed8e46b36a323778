"""load_file: every kind of unreadable file is named with what it is and what to do; only a file that really holds
pickled objects is answered with the trust_pickle advice."""

import argparse
import os
import random
import re

import pytest
import torch

from sh2.checkpoints import CheckpointError, CheckpointHint, load_file


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(100_000, dtype=torch.float32)}, "global_step": 4}, path)
    return path


def test_a_complete_checkpoint_loads(good):
    assert load_file(good)["global_step"] == 4


@pytest.mark.parametrize("damage,needle", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is truncated or corrupt"),
    ("random", "is not a PyTorch checkpoint (not a PyTorch file"),
    ("yaml", "is not a PyTorch checkpoint (a text file: it starts with b'model:"),
    ("missing", "does not exist"),
    ("folder", "is a folder, not a checkpoint file"),
])
def test_unreadable_files_are_named_with_what_is_wrong_and_no_trust_pickle_advice(good, tmp_path, damage, needle):
    path = tmp_path / "bad.ckpt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(4096).replace(b"\x80", b"\x81").replace(b"PK", b"pk"))
    elif damage == "yaml":
        path.write_text("model:\n  preset: tiny\n")
    elif damage == "folder":
        path.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(needle)) as err:
        load_file(path)
    assert str(path) in str(err.value) and not err.value.hints


def test_a_corrupt_pickle_stream_is_corrupt_not_untrusted(tmp_path):
    """A pickle header, then garbage (no GLOBAL opcode): whatever the unpickler trips on (an unknown opcode, an
    empty stack, a missing memo entry), it is reported as a corrupt file, for each of 300 fixed streams."""
    path = tmp_path / "legacy.pt"
    gen = random.Random(0)
    for _ in range(300):
        path.write_bytes(b"\x80\x02" + gen.randbytes(64).replace(b"c", b"d"))
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_file(path)
        assert CheckpointHint.TRUST_PICKLE not in err.value.hints


def test_pickled_objects_ask_for_trust(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"settings": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects besides tensors \(the first: argparse"
                                              r"\.Namespace\)") as err:
        load_file(path)
    assert CheckpointHint.TRUST_PICKLE in err.value.hints
    assert load_file(path, trust_pickle=True)["settings"].a == 1
