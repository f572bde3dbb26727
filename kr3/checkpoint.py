"""Self-describing checkpoints: one file holds weights, optimizer, schedule, step, RNG states, data
position, model config, run config and the tokenizer's own files, so `generate`, `evaluate` and
`resume` need nothing but its path. Written to a temp file and renamed: never found half-written."""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from kr3.atomic import replacing
from kr3.errors import UserError, first_line
from kr3.ratings import Condition

FORMAT_VERSION = 2  # 1: the same dict, written before the records were typed; it loads
READS = (1, 2)  # the format versions load() reads
CKPT_DIR = "checkpoints"
BEST = "best.pt"
_STEP = re.compile(r"step-(\d+)\.pt$")


@dataclass
class DataRecord:
    """The prepared data a checkpoint was trained on (the fields a file lacks are None)."""

    dir: str | None = None
    name: str | None = None
    fingerprint: str | None = None
    position: dict | None = None  # where the data order stood (kr3.batches.Batches.position)
    splits: dict | None = None  # meta.json's splits
    eos_id: int | None = None
    dtype: str | None = None
    condition: Condition | None = None  # data.condition=rating's control tokens


@dataclass
class TokenizerRecord:
    """The tokenizer a checkpoint's token ids are: its files, so the checkpoint needs nothing beside it."""

    dir: str | None = None
    spec: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Schedule:
    """The learning-rate schedule a run follows."""

    kind: str = "warmup_cosine"
    total_steps: int = 0
    warmup_steps: int = 0
    max_time: str | None = None  # trainer.max_time, when it chose total_steps


@dataclass
class Checkpoint:
    """The checkpoint format, defined once: what `save` writes (a dict of these fields, the records as dicts, and
    `format_version`) and `load` gives back. Fields without a default are what generate/evaluate read; RESUME_REQUIRED
    is what resuming reads too. Unknown keys in a file are ignored, so a later kr3 may add fields."""

    model_config: dict  # GPTConfig.to_dict()
    model: dict  # state_dict, fp32
    step: int
    config: dict  # the run's whole config, resolved
    data: DataRecord
    tokenizer: TokenizerRecord
    optimizer: dict | None = None  # the optimizer's state_dict()
    scheduler: Schedule | None = None
    rng: dict | None = None  # torch (and cuda) RNG states
    val: dict | None = None  # the evaluation at this step, if any (the final one for a finished run)
    best_val_loss: float = math.inf
    best_val_tokens: int | None = None  # the val tokens best_val_loss was measured on
    wandb_run_id: str | None = None
    torch_version: str = ""
    base: dict | None = None  # the pretrained model it started from: name_or_path, folder, sha256 per file, license
    wall_s: float = 0.0  # seconds the run trained to reach this step, summed over its parts (resumes)
    stale_evals: int = 0  # periodic evaluations in a row without an improvement (trainer.early_stop)
    early_stopped: int | None = None  # the step at which trainer.early_stop ended the run

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **{f.name: as_saved(getattr(self, f.name)) for f in fields(self)}}

    @property
    def condition(self) -> Condition | None:
        return self.data.condition


RECORDS = {"data": DataRecord, "tokenizer": TokenizerRecord, "scheduler": Schedule}  # fields saved as dicts


def as_saved(value):
    """A record as the file keeps it: a dict (a condition as its meta.json form)."""
    if isinstance(value, Condition):
        return value.record()
    if is_dataclass(value):
        return {f.name: as_saved(getattr(value, f.name)) for f in fields(value)}
    return value


def as_record(name: str, value):
    """A field of a file as its record: a dict into its dataclass (keys it does not know left out)."""
    if name not in RECORDS or not isinstance(value, dict):
        return value
    schema = RECORDS[name]
    known = {f.name: value[f.name] for f in fields(schema) if f.name in value}
    if "condition" in known:
        known["condition"] = Condition.of(known["condition"])
    return schema(**known)


REQUIRED = tuple(f.name for f in fields(Checkpoint) if f.default is MISSING)
RESUME_REQUIRED = ("optimizer", "scheduler", "rng", "val", "best_val_loss")


def save(ckpt: Checkpoint, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}.pt"


def best_path(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR / BEST


def step_of(path: Path) -> int:
    return int(_STEP.search(Path(path).name)[1])


def list_steps(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    return sorted((p for p in d.glob("step-*.pt") if _STEP.search(p.name)), key=step_of)


def prune(run_dir: Path, keep: int) -> None:
    for p in list_steps(run_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def remove_temps(run_dir: Path) -> None:
    """Temp files of saves killed before their rename (SIGKILL, a lost machine): never a checkpoint."""
    for p in (Path(run_dir) / CKPT_DIR).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def resolve(path: str | Path, prefer_best: bool = False) -> Path:
    """A checkpoint file, or a run folder (its best or newest checkpoint)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist — give a .pt file or a run folder with checkpoints/")
    found = newest(path, prefer_best)
    if found is None:
        raise UserError(f"no checkpoints in {path} — train first (stage=train), or give a .pt file")
    return found


def newest(run_dir: Path, prefer_best: bool = False) -> Path | None:
    """A run folder's newest step checkpoint, else its best.pt (a run stopped between its first evaluation and its
    first step checkpoint has only that); with `prefer_best`, best.pt first. None when it has neither."""
    best = best_path(run_dir)
    if prefer_best and best.exists():
        return best
    steps = list_steps(run_dir)
    return steps[-1] if steps else best if best.exists() else None


def load(path: str | Path, resume: bool = False) -> Checkpoint:
    """The checkpoint at `path`, with every field generate/evaluate read (and, with `resume`, what resuming reads)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns before refusing a foreign pickle: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist — check the path") from None
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused
        raise UserError(
            f"checkpoint {path} is corrupt or not a kr3 checkpoint ({type(e).__name__}) — use another one, "
            "e.g. an earlier step-*.pt of the same run"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"{path} is not a kr3 checkpoint — give a file written by stage=train")
    if state["format_version"] not in READS:
        raise UserError(
            f"checkpoint {path} has format_version {state['format_version']!r}, this kr3 reads "
            f"{' and '.join(map(str, READS))} "
            "— use the kr3 version that wrote it"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete (no {', '.join(missing)}) — use another one, e.g. an earlier "
                        "step-*.pt of the same run")
    wrong = [k for k in REQUIRED if not isinstance(state[k], int if k == "step" else dict)]
    if wrong:
        raise UserError(f"checkpoint {path} holds {', '.join(wrong)} of the wrong kind — it was changed after "
                        "training; use another one")
    missing = [k for k in RESUME_REQUIRED if resume and k not in state]
    if missing:
        raise UserError(f"checkpoint {path} holds no {', '.join(missing)} (weights only?), so it cannot be resumed "
                        "— resume from a step-*.pt written by stage=train, or train anew without trainer.resume")
    return Checkpoint(**{f.name: as_record(f.name, state[f.name]) for f in fields(Checkpoint) if f.name in state})


def find_latest_run(log_dir: str | Path) -> Path:
    """The run folder (under outputs/ or multirun/) whose newest checkpoint was written last."""
    log_dir = Path(log_dir)
    candidates = [p for pattern in ("outputs/*/*/checkpoints/*.pt", "outputs/*/checkpoints/*.pt",
                                    "multirun/*/*/*/checkpoints/*.pt") for p in log_dir.glob(pattern)]
    if not candidates:
        raise UserError(f"checkpoint=latest found no checkpoints under {log_dir}/outputs or multirun — train first, or "
                        "give a path")
    return max(candidates, key=lambda p: p.stat().st_mtime).parent.parent


def locate(path: str | Path | None, log_dir: str | Path | None = None) -> Path:
    """The file `checkpoint=` means: a .pt file, a run folder (its best, else newest checkpoint) or `latest`
    (the run under `log_dir` whose newest checkpoint was written last)."""
    if path is None:
        raise UserError("this stage needs a checkpoint — add checkpoint=PATH (a .pt file or run folder) or checkpoint=latest")
    if not isinstance(path, str | Path):
        raise UserError(f"a checkpoint is a path (a .pt file or a run folder) or \"latest\", not {type(path).__name__}")
    return resolve(find_latest_run(log_dir) if str(path) == "latest" else path, prefer_best=True)


def run_folder(path: Path) -> Path:
    """The run folder a checkpoint file belongs to."""
    return path.parent.parent if path.parent.name == CKPT_DIR else path.parent


def load_model(path: str | Path, device):
    """(model, tokenizer, Checkpoint) of a checkpoint file or a run folder (its best, else newest checkpoint); the
    model is in eval mode on `device`."""
    from kr3 import tokenizer as ktok
    from kr3.model import GPT, GPTConfig

    path = resolve(path, prefer_best=True)
    ckpt = load(path)
    try:
        model = GPT(GPTConfig(**ckpt.model_config))
        model.load_state_dict(ckpt.model)
        tokenizer = ktok.from_files(ckpt.tokenizer.files)
    except Exception as e:  # a file edited after training: fields of other types, shapes or keys
        raise UserError(f"checkpoint {path} holds a model or tokenizer kr3 cannot rebuild ({first_line(e)}) — it was "
                        "changed after training; use another checkpoint") from None
    model.to(device).eval()
    return model, tokenizer, ckpt
