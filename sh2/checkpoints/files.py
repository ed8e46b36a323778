"""Reading checkpoint files: byte shards, memory-mapped ``torch.load`` and integrity checks.

Large Evo 2 files are published as byte shards ``NAME.pt.part0 .. NAME.pt.partN`` that must be
concatenated in order. :func:`assemble_shards` streams them into ``NAME.pt`` beside the shards (1 MiB
at a time, never the whole file in memory), checks that the numbering has no gap and that the result is
a complete zip archive (the container ``torch.save`` writes), and is a no-op when an up-to-date
``NAME.pt`` already exists. :func:`load_file` then opens it with ``torch.load(mmap=True,
weights_only=True)``: tensors stay on disk until they are read, so loading a 40B checkpoint does not need
40B parameters' worth of RAM on top of the model.
"""

from __future__ import annotations

import enum
import io
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class CheckpointHint(enum.Enum):
    """What the user can do about a :class:`CheckpointError`; the caller words it for its own settings."""

    TRUST_PICKLE = "allow pickled Python objects in the file (trusted files only)"
    INSTALL_PACKAGE = "install the package the message names"
    MATCH_ARCHITECTURE = "load into a model of the checkpoint's architecture"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message says what to fix.

    Args:
        message: what is wrong, naming the file and key.
        hints: what the user can do about it, set where the error is raised; empty when the checkpoint
            itself is missing, incomplete or of an unknown format.
    """

    def __init__(self, message: str, hints: Iterable[CheckpointHint] = ()) -> None:
        super().__init__(message)
        self.hints = frozenset(hints)

    def __reduce__(self) -> tuple[Any, ...]:  # keep the hints when the error crosses processes
        return type(self), (str(self), self.hints)


_PART = re.compile(r"^(?P<base>.+)\.part(?P<idx>\d+)$")


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The byte shards ``PATH.part0 .. PATH.partN`` of ``path`` in order (empty if there are none).

    Raises:
        CheckpointError: when the numbering has a gap (a shard is missing).
    """
    path = Path(path)
    parts: dict[int, Path] = {}
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            m = _PART.match(candidate.name)
            if m and m.group("base") == path.name:
                parts[int(m.group("idx"))] = candidate
    if not parts:
        return []
    missing = [i for i in range(max(parts) + 1) if i not in parts]
    if missing:
        raise CheckpointError(f"checkpoint {path} is split into byte shards but shard {path}.part{missing[0]} is "
                              f"missing (found parts {sorted(parts)}); download every part and keep the "
                              f"numbering NAME.part0 .. NAME.part{max(parts)}")
    return [parts[i] for i in range(len(parts))]


def _check_zip(path: Path, origin: str) -> None:
    """Raise a clear error if ``path`` (a torch zip checkpoint) is truncated or corrupt."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        return  # legacy (non-zip) torch format: torch.load reports its own errors
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} extends past the end of the file")
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err}){origin}; download it again "
                              f"and compare its size with the published one") from None


def give_default_permissions(path: str | os.PathLike) -> None:
    """Set ``path``'s mode to what ``open`` would have given it under the process umask (usually ``rw-r--r--``).

    Writers that stage a file through ``tempfile.mkstemp`` or ``safetensors.torch.save_file`` leave it
    ``rw-------``; exported weights and FASTA indexes are meant to be shared on a cluster like any other file.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def assemble_shards(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Concatenate ``PATH.part0 .. PATH.partN`` into one file and return its path.

    Streams the shards in order into ``out_dir/NAME`` (default: beside the shards) through a temporary
    file that is renamed when complete, so an interrupted run never leaves a half-written checkpoint.
    An existing file whose size equals the sum of the shards is reused. If there are no shards, ``path``
    itself is returned (after checking it exists).

    Raises:
        CheckpointError: missing file, missing shard, or an assembled file that is not a complete archive
            (a truncated shard).
    """
    path = Path(path)
    m = _PART.match(path.name)
    if m and shard_paths(path.with_name(m.group("base"))):
        path = path.with_name(m.group("base"))  # the user named one shard: assemble the whole file
    parts = shard_paths(path)
    if not parts:
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist (and no shards {path}.part0.. were found)")
        return path
    target = Path(out_dir) / path.name if out_dir is not None else path
    total = sum(p.stat().st_size for p in parts)
    origin = f" (assembled from {len(parts)} shards {parts[0].name} .. {parts[-1].name}: one is probably truncated)"
    if not (target.exists() and target.stat().st_size == total):
        tmp = target.with_name(target.name + ".assembling")
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write the assembled checkpoint {target} ({err}); pass a writable "
                                  f"out_dir with enough free space ({total / 2**30:.1f} GiB)") from None
    _check_zip(target, origin)
    return target


def _not_a_checkpoint(path: Path) -> CheckpointError | None:
    """An error when ``path`` cannot be a ``torch.save`` file at all (missing, empty, or another kind of file),
    judged from its size and first bytes; None when it may be one."""
    if not path.exists():
        return CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pt/.ckpt file inside it")
    if path.stat().st_size == 0:
        return CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted save, download or copy; "
                               f"use another checkpoint or copy it again")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # torch.save writes a zip archive; its legacy format (and plain pickles of protocol 2+) start with 0x80
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    try:
        text = "".join(head.decode("utf-8").split())
    except UnicodeDecodeError:
        text = "\0"
    kind = "a text file" if text.isprintable() else "not a PyTorch file"
    return CheckpointError(f"{path} is not a PyTorch checkpoint ({kind}: it starts with {head!r}); pass a file "
                           f"written by torch.save (an sh2 .ckpt, an evo2 .pt) or sh2 safetensors")


# what the unpicklers raise on bytes that are not a valid stream: besides the I/O errors, a garbled opcode
# sequence pops an empty stack (IndexError), reads a missing memo entry (KeyError), calls with the wrong arguments
# (TypeError) or unpacks a short field (struct.error)
_CORRUPT_STREAM = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, ArithmeticError,
                   struct.error)


def load_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """``torch.load`` a checkpoint on the CPU, memory-mapped and weights-only where possible.

    Args:
        path: a ``.pt``/``.ckpt`` file (byte shards must be assembled first, see :func:`assemble_shards`).
        trust_pickle: allow arbitrary pickled objects (DeepSpeed/Savanna files can hold them). Only for
            files from a trusted source.

    Raises:
        CheckpointError: a missing, empty, truncated or corrupt file, a file that is not a checkpoint, or pickled
            objects that need ``trust_pickle=True`` (only then with :attr:`CheckpointHint.TRUST_PICKLE`).
    """
    path = Path(path)
    if (err := _not_a_checkpoint(path)) is not None:
        raise err
    _check_zip(path, "")
    safe = [io.BytesIO]  # Transformer Engine stores FP8 metadata (_extra_state) as BytesIO
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    with open(path, "rb") as fh:
        kwargs["mmap"] = fh.read(4) == b"PK\x03\x04"  # only zip checkpoints can be memory-mapped
    corrupt = (f"checkpoint {path} is truncated or corrupt ({{}}); use another checkpoint (e.g. another step's "
               f"file beside it) or copy it again")
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        # the weights-only unpickler names a disallowed class as "Unsupported global: GLOBAL module.Class"; any
        # other complaint (an unknown opcode) means the bytes are not a valid pickle at all
        if "GLOBAL" not in str(err):
            raise CheckpointError(corrupt.format(_first_line(err))) from None
        if not trust_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise CheckpointError(f"{path} contains pickled Python objects besides tensors (the first: "
                                  f"{found.group(1) if found else 'unknown'}), which can run code when loaded. "
                                  f"If you trust the file, load it with trust_pickle=True",
                                  hints=[CheckpointHint.TRUST_PICKLE]) from None
    except (*_CORRUPT_STREAM, zipfile.BadZipFile) as err:
        raise CheckpointError(corrupt.format(_first_line(err) or type(err).__name__)) from None
    try:
        return torch.load(path, weights_only=False, **kwargs)
    except (pickle.UnpicklingError, *_CORRUPT_STREAM) as err:
        raise CheckpointError(corrupt.format(_first_line(err) or type(err).__name__)) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded ``torch.distributed.checkpoint`` folder (what Lightning's FSDP2 and sh2's
    context-parallel strategies write as ``*.ckpt`` by default): a directory with a ``.metadata`` file."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_distributed_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """The model weights of a sharded Lightning checkpoint folder, as ``{"state_dict", "hyper_parameters"}``.

    Reads only the tensors under ``state_dict`` (not the optimizer state), in one process and without a
    process group, so a model trained with FSDP2 / context parallelism on many GPUs can be loaded on one
    device or the CPU. The hyper-parameters come from the folder's ``meta.pt`` when it is readable.

    Raises:
        CheckpointError: the folder has no model weights or cannot be read.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    reader = FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # any unreadable metadata is a user-facing checkpoint error
        raise CheckpointError(f"cannot read the sharded checkpoint {path} ({err})") from None
    planner_data = getattr(metadata, "planner_data", None) or {}
    weights: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        where = planner_data.get(key)
        if where is not None:
            if len(where) != 2 or where[0] != "state_dict":
                continue
            name = str(where[1])
        elif key.startswith("state_dict."):
            name = key[len("state_dict."):]
        else:
            continue
        if isinstance(meta, TensorStorageMetadata):
            weights[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if not weights:
        raise CheckpointError(f"{path} is a sharded checkpoint folder without model weights (no 'state_dict' "
                              f"entries); pass a Lightning checkpoint saved by sh2 fit")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp_load({"state_dict": weights}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot read the sharded checkpoint {path} ({str(err)[:300]}); is a shard "
                              f"(__R_0.distcp) missing or truncated?") from None
    hyper_parameters: dict[str, Any] = {}
    meta_file = path / "meta.pt"
    if meta_file.is_file():
        try:
            hyper_parameters = dict(load_file(meta_file, trust_pickle=trust_pickle).get("hyper_parameters") or {})
        except (CheckpointError, AttributeError):
            hyper_parameters = {}
    return {"state_dict": weights, "hyper_parameters": hyper_parameters}


def follow_latest(path: str | os.PathLike) -> Path:
    """A DeepSpeed checkpoint folder's tag folder, named by its ``latest`` file; ``path`` itself without one.

    Raises:
        CheckpointError: ``latest`` is unreadable or names no folder in ``path``.
    """
    path = Path(path)
    latest = path / "latest"
    if not (path.is_dir() and latest.is_file()):
        return path
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{latest} is unreadable ({err}); pass the checkpoint's tag folder itself") from None
    if not name or not (path / name).is_dir():
        raise CheckpointError(f"{path}: its 'latest' file names {name!r}, which is not a folder in it (an "
                              f"incomplete copy?); pass the tag folder itself or fix 'latest'")
    return path / name


def deepspeed_checkpoint_tag(path: str | os.PathLike, trust_pickle: bool = False) -> Path | None:
    """The tag folder of a DeepSpeed checkpoint written by a Lightning run, else None.

    Lightning's DeepSpeed strategies write ``last.ckpt/`` as a folder with a ``latest`` file naming the tag
    folder (``checkpoint/``) that holds ``*model_states.pt`` (with Lightning's hyper-parameters) and
    ``*optim_states.pt`` (the fp32 weights, partitioned). Savanna's ``global_stepN`` folders are DeepSpeed
    checkpoints too but carry no hyper-parameters; they are read by the Savanna reader instead. A model-states
    file that cannot be read without ``trust_pickle`` counts as a Lightning one (reading it needs that anyway).

    Raises:
        CheckpointError: a ``latest`` file that names no folder.
    """
    tag = follow_latest(path)
    if not tag.is_dir():
        return None
    states = sorted(tag.glob("*model_states.pt"))
    if not states or not sorted(tag.glob("*optim_states.pt")):
        return None
    try:
        client = load_file(states[0], trust_pickle=trust_pickle)
    except CheckpointError:
        return tag
    return tag if isinstance(client, dict) and "hyper_parameters" in client else None


def load_deepspeed_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """The fp32 model weights of a Lightning DeepSpeed checkpoint folder (ZeRO 1-3, any number of ranks),
    as ``{"state_dict", "hyper_parameters"}``, in one process on the CPU.

    The weights are gathered from the ZeRO partitions of the optimizer files with DeepSpeed's own
    ``zero_to_fp32`` (the only complete fp32 copy; ZeRO-3 model files hold none).

    Raises:
        CheckpointError: not such a folder, ``trust_pickle`` not set (DeepSpeed's optimizer files hold pickled
            objects), or the ``deepspeed`` package missing.
    """
    tag = deepspeed_checkpoint_tag(path, trust_pickle)
    if tag is None:
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint folder written by sh2/Lightning")
    if not trust_pickle:
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint folder: its fp32 weights are in DeepSpeed's "
                              f"optimizer files, which hold pickled Python objects. If you trust the folder "
                              f"(e.g. your own run), load it with trust_pickle=True (in a config: "
                              f"model.init_from_trust_pickle: true)", hints=[CheckpointHint.TRUST_PICKLE])
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint folder; reading it needs the deepspeed package: "
                              f"pip install 'sh2[deepspeed]'", hints=[CheckpointHint.INSTALL_PACKAGE]) from None
    client = load_file(sorted(tag.glob("*model_states.pt"))[0], trust_pickle=True)
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    except Exception as err:  # DeepSpeed raises assorted errors on incomplete folders
        raise CheckpointError(f"cannot read the DeepSpeed checkpoint {path}: {type(err).__name__}: {err}") from None
    prefix = "_forward_module."  # Lightning's wrapper around the LightningModule inside the DeepSpeed engine
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
    return {"state_dict": state, "hyper_parameters": client.get("hyper_parameters") or {}}
