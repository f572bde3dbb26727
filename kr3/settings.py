"""kr3's settings, typed: a dataclass per config group (data, tokenizer, model, trainer, logger, paths) and per stage
block of conf/config.yaml (prepare, generate, evaluate, export, serve, report), under one root, `Settings`.

Each is registered in Hydra's ConfigStore as the base of its YAML files (`defaults: [/kr3_<name>@_here_, _self_]`), so
Hydra and OmegaConf themselves refuse a key that does not exist and a value of the wrong type; the YAML files hold the
values and the comments users read. Ranges and rules across fields are checked once, in each class's
`__post_init__`, when a stage turns the config into objects (`typed`). Nothing here imports torch."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from omegaconf import MISSING, OmegaConf

from kr3.errors import UserError

MAX_DEPTH = 64  # model.depth: far past any model kr3 trains (depth 64 is d_model 3,072)
DEPTH_SETS = ("n_layers", "n_heads", "d_model", "d_ffn")  # the model settings model.depth gives values to
MAX_GUIDANCE = 100.0  # far past any use (3 steers a small model fully); larger ones only overflow


def bound(low: float | None = None, *, above: float | None = None, high: float | None = None, finite: bool = True):
    """A field its YAML file gives (no default here), with the range its class checks: ≥ `low` or > `above`, ≤ `high`;
    a number is finite unless `finite=False`."""
    return field(default=MISSING, metadata={"low": low, "above": above, "high": high, "finite": finite})


def given():
    """A field its YAML file gives, with no range."""
    return field(default=MISSING)


class Checked:
    """Range checks from the fields' `bound`s, then `check` (rules across fields), run when the object is made."""

    SECTION: ClassVar[str] = ""  # the key of this block in the config: `trainer`, `data.clean`, `` (top level)

    def __post_init__(self):
        for f in fields(self):
            if f.metadata:
                check_range(self.name(f.name), getattr(self, f.name), f.type, **f.metadata)
        self.check()

    def check(self) -> None:
        """Rules across fields; one line each."""

    def name(self, key: str) -> str:
        return f"{self.SECTION}.{key}" if self.SECTION else key


def check_range(name: str, value, kind, low=None, above=None, high=None, finite=True) -> None:
    """`trainer.batch_size=0 must be an integer ≥ 1`: the one-line error of a value out of its field's range (`kind`:
    the field's type as written, `int | None`)."""
    nullable = "None" in str(kind)
    if value is None and nullable:
        return
    whole = "int" in str(kind)
    ok = (isinstance(value, numbers.Integral if whole else numbers.Real) and not isinstance(value, bool)
          and (not finite or isinstance(value, numbers.Integral) or math.isfinite(value))  # an int of any size is finite
          and (low is None or value >= low) and (above is None or value > above) and (high is None or value <= high))
    if not ok:
        limits = [f"≥ {low}" if low is not None else "", f"> {above}" if above is not None else "",
                  f"≤ {high}" if high is not None else ""]
        # as typed: a float field holds trainer.lr=1 as 1.0
        shown = "null" if value is None else int(value) if isinstance(value, float) and value.is_integer() \
            and abs(value) < 1e15 else value
        rule = f"must be {'an integer' if whole else 'a number'} {' and '.join(x for x in limits if x)}".rstrip()
        raise OutOfRange(name, shown, rule + (", or null" if nullable else ""))


class OutOfRange(UserError):
    """A value outside its setting's range: `name=shown rule` (`trainer.lr=-1 must be a number ≥ 0`); the server
    names the request's parameter instead (`key`, the setting's last part)."""

    def __init__(self, name: str, shown, rule: str):
        super().__init__(f"{name}={shown} {rule}")
        self.key, self.shown, self.rule = name.rsplit(".", 1)[-1], shown, rule


def check_value(schema: type, key: str, value) -> None:
    """One field's range check, for a value set on its own (the REPL's `:temperature 2`)."""
    f = next(f for f in fields(schema) if f.name == key)
    if f.metadata:
        check_range(f"{schema.SECTION}.{key}", value, f.type, **f.metadata)


def typed(node) -> Any:
    """A config node (the whole config, or a block of it) as its settings object, checked; a settings object as it is."""
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def plain(obj) -> Any:
    """Settings (a settings object or a config node) as plain dicts and lists: for JSON, hashes and checkpoints."""
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    return asdict(obj) if is_dataclass(obj) else obj


def saved_block(current, saved: dict):
    """This run's settings block `current` replaced by a checkpoint's copy of it, `saved` (a dict): of the saved one's
    kind (a tokenizer's, a model's), with its values; keys the checkpoint lacks keep this run's (a later kr3 added
    them), keys kr3 no longer knows are left out."""
    schema = kind_of(type(current), saved)
    known = {f.name for f in fields(schema)}
    base = plain(current) if isinstance(current, schema) else {}
    merged = OmegaConf.merge(OmegaConf.structured(schema), base, {k: v for k, v in saved.items() if k in known})
    return OmegaConf.to_object(merged)


def kind_of(schema: type, values: dict) -> type:
    """The schema of a block's `values` among its group's kinds (tokenizers and loggers by `kind`, models by whether
    they name a pretrained one)."""
    if schema in (SentencePieceTokenizer, PretrainedTokenizer):
        return PretrainedTokenizer if values.get("kind") == "pretrained" else SentencePieceTokenizer
    if schema in (ModelShape, PretrainedModel):
        return PretrainedModel if values.get("name_or_path") else ModelShape
    return schema



@dataclass
class Paths(Checked):
    """Where kr3 reads and writes (conf/paths/default.yaml)."""

    SECTION = "paths"
    root_dir: str = given()  # the project folder: data/, outputs/ and multirun/ go under it
    data_dir: str = given()  # prepared datasets: <data_dir>/<name>/
    log_dir: str = given()  # outputs/ and multirun/ go under it
    output_dir: str = given()  # this run's folder


@dataclass
class Clean(Checked):
    """Cleaning each review (data.clean)."""

    SECTION = "data.clean"
    nfc: bool = given()
    strip_control: bool = given()
    collapse_whitespace: bool = given()
    min_chars: int = bound(0)
    max_chars: int | None = bound(1)
    dedupe: bool = given()


@dataclass
class Data(Checked):
    """The corpus and how it is cleaned and split (conf/data/*.yaml)."""

    SECTION = "data"
    name: str = given()  # names the prepared folder
    source: str = given()  # hub | local (kr3.data.SOURCES)
    hub_id: str = given()
    revision: str | None = given()
    split: str = given()
    path: str | None = given()
    text_column: str = given()
    label_column: str | None = given()
    drop_columns: list[str] = given()
    ratings: list[int] | None = given()
    condition: str | None = given()  # rating | null
    val_ratio: float = given()  # kr3.data.split checks it with test_ratio
    test_ratio: float = given()
    cache_dir: str | None = given()
    clean: Clean = given()


@dataclass
class SentencePieceTokenizer(Checked):
    """A SentencePiece model trained on the train split (conf/tokenizer/sentencepiece.yaml)."""

    SECTION = "tokenizer"
    kind: str = given()
    model_type: str = given()  # bpe | unigram
    vocab_size: int = given()  # kr3.tokenizer checks it against the corpus
    character_coverage: float = bound(above=0, high=1)
    byte_fallback: bool = given()
    input_sentence_size: int = bound(1)
    max_sentence_length: int = bound(1)
    train_threads: int = bound(1)


@dataclass
class PretrainedTokenizer(Checked):
    """A Hugging Face tokenizer: a Hub id or a folder with tokenizer.json (conf/tokenizer/pretrained.yaml)."""

    SECTION = "tokenizer"
    kind: str = given()
    name_or_path: str = given()


@dataclass
class ModelShape(Checked):
    """A GPT trained from random weights (conf/model/{tiny,small,base}.yaml); kr3.model.GPTConfig checks the shape."""

    SECTION = "model"
    n_layers: int = given()
    n_heads: int = given()
    d_model: int = given()
    d_ffn: int = given()
    block_size: int = given()
    dropout: float = given()
    bias: bool | None = given()  # null: the arch's (GPTConfig.from_cfg)
    arch: str = given()  # gpt2 | llama (kr3.model)
    rating_embedding: bool = given()
    depth: Any = None  # null: the shape above | a number of layers, which sets the rest | auto (kr3.sizing)
    tokens_per_param: float = bound(above=0)  # depth=auto: the tokens each parameter should see in trainer.max_time

    def check(self):
        d = self.depth
        if d is not None and d != "auto" and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DEPTH):
            raise UserError(f"model.depth={d} must be a number of layers from 1 to {MAX_DEPTH}, auto or null")


@dataclass
class PretrainedModel(Checked):
    """A pretrained GPT-2-family model to fine-tune (conf/model/pretrained.yaml)."""

    SECTION = "model"
    name_or_path: str = given()
    block_size: int = bound(1)
    dropout: float | None = bound(0, high=0.999)
    rating_embedding: bool = given()


@dataclass
class Profile(Checked):
    SECTION = "trainer.profile"
    start: int = bound(0)
    steps: int = bound(0)


@dataclass
class EarlyStop(Checked):
    SECTION = "trainer.early_stop"
    patience: int | None = bound(1)
    min_delta: float = bound(0)


PACKINGS = ("stream", "reviews")


@dataclass
class Trainer(Checked):
    """Optimization, evaluation, checkpoints and resume (conf/trainer/default.yaml)."""

    SECTION = "trainer"
    batch_size: int = bound(1)
    grad_accum: int = bound(1)
    max_steps: int | None = bound(1)
    epochs: float = bound(above=0)
    packing: str = given()  # stream | reviews (kr3.batches.Batches)
    max_time: Any = given()  # seconds, or 90s / 15m / 2h (kr3.trainer.parse_duration)
    lr: float = bound(0)
    optimizer: str = given()  # adamw | muon
    muon_lr: float = bound(0)
    embedding_lr: float | None = bound(0)
    min_lr_ratio: float = bound(0, high=1)
    warmup_steps: int = bound(0)
    weight_decay: float = bound(0)
    betas: list[float] = given()
    rating_loss: float = bound(0)
    rating_loss_rows: float = bound(above=0, high=1)
    grad_clip: float = bound(0)
    precision: str = given()
    compile: bool = given()
    device: str = given()
    threads: int | None = bound(1)
    log_interval: int = bound(1)
    eval_interval: int = bound(0)
    eval_tokens: int | None = bound(1)
    final_eval_tokens: int | None = bound(1)
    eval_batch_size: int = bound(1)
    ckpt_interval: int = bound(0)
    keep_last: int = bound(0)
    resume: str | None = given()
    sample_prompts: Any = given()  # a list of prompts (or one), or null
    sample_tokens: int = bound(1)
    peak_flops: float | None = given()
    profile: Profile = given()
    early_stop: EarlyStop = given()

    def check(self) -> None:
        betas = self.betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise UserError(f"trainer.betas={list(betas)} must be two numbers in [0, 1), e.g. trainer.betas=[0.9,0.95]")
        if self.packing not in PACKINGS:
            raise UserError(f"trainer.packing={self.packing} is not one of {' | '.join(PACKINGS)}")
        if self.max_time is not None and self.max_steps is not None:
            raise UserError(f"trainer.max_time={self.max_time} and trainer.max_steps={self.max_steps} both set how long "
                            f"the run is — drop one (trainer.max_time=null trains {self.max_steps} steps)")


@dataclass
class WandbLogger(Checked):
    """Weights & Biases (conf/logger/wandb.yaml)."""

    SECTION = "logger"
    kind: str = given()
    project: str = given()
    entity: str | None = given()
    group: str | None = given()
    name: str | None = given()
    tags: list[str] = given()
    mode: str = given()  # offline | online | disabled


@dataclass
class NoLogger(Checked):
    SECTION = "logger"
    kind: str = given()


@dataclass
class Prepare(Checked):
    SECTION = "prepare"
    force: bool = given()


@dataclass
class Decoding(Checked):
    """How a completion is decoded: the one definition of each option and its range, for stage=generate, the REPL's
    `:settings`, kr3.load(...).complete/stream, the server's requests and the trainer's samples."""

    SECTION = "generate"
    temperature: float = bound(0)
    top_k: int | None = bound(0)
    top_p: float | None = bound(above=0, high=1)
    repetition_penalty: float = bound(above=0)
    max_new_tokens: int = bound(1)
    min_new_tokens: int = bound(0)
    num_samples: int = bound(1)
    seed: int = bound(0, high=2**63 - 1)
    guidance: float = bound(1, high=MAX_GUIDANCE)
    stop: Any = given()  # a string or a list of them
    rating: Any = given()  # negative | positive | ambiguous, 0 | 1 | 2, or null


@dataclass
class Generate(Decoding):
    """stage=generate (conf/config.yaml's generate: block); its decoding options are the API's and the server's
    defaults."""

    prompt: str | None = given()
    prompts_file: str | None = given()
    output: str | None = given()
    show_next: int | None = bound(0)
    device: str = given()
    precision: str = given()


@dataclass
class Evaluate(Checked):
    SECTION = "evaluate"
    split: str = given()
    max_tokens: int | None = bound(1)
    batch_size: int = bound(1)
    device: str = given()
    precision: str = given()
    tasks: list[str] = given()
    include_path: str | None = given()
    limit: int | None = bound(1)


@dataclass
class Export(Checked):
    SECTION = "export"
    dir: str | None = given()
    license: str | None = given()


@dataclass
class Report(Checked):
    SECTION = "report"
    dir: str | None = given()
    replicate_keys: list[str] = given()
    baseline: str | None = given()


@dataclass
class Serve(Checked):
    SECTION = "serve"
    host: str = given()
    port: int = bound(0, high=65535)
    api_key: str | None = given()
    model_name: str = given()
    max_body_bytes: int = bound(1)
    max_tokens: int = bound(1)
    max_n: int = bound(1)
    max_prompts: int = bound(1)
    max_next_tokens: int = bound(1)
    max_active: int = bound(1)
    max_batch: int = bound(1)
    threads: int | None = bound(1)
    device: str = given()
    precision: str = given()


@dataclass
class Settings(Checked):
    """The whole config (conf/config.yaml and its groups)."""

    data: Data = given()
    tokenizer: Any = given()  # SentencePieceTokenizer | PretrainedTokenizer
    model: Any = given()  # ModelShape | PretrainedModel
    trainer: Trainer = given()
    logger: Any = given()  # WandbLogger | NoLogger
    paths: Paths = given()
    stage: str = given()
    seed: int = bound(0, high=2**63 - 1)
    checkpoint: str | None = given()
    prepare: Prepare = given()
    generate: Generate = given()
    evaluate: Evaluate = given()
    export: Export = given()
    report: Report = given()
    serve: Serve = given()


# ConfigStore name -> schema: conf/<group>/<option>.yaml names its schema first in its defaults list
SCHEMAS = {"kr3_settings": Settings, "kr3_data": Data, "kr3_tokenizer_sentencepiece": SentencePieceTokenizer,
           "kr3_tokenizer_pretrained": PretrainedTokenizer, "kr3_model_shape": ModelShape,
           "kr3_model_pretrained": PretrainedModel, "kr3_trainer": Trainer, "kr3_logger_wandb": WandbLogger,
           "kr3_logger_none": NoLogger, "kr3_paths": Paths}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (before a config is composed)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)
