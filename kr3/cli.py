"""The kr3 command: `kr3 stage=<prepare|train|generate|evaluate|export|serve|report> [overrides]` once installed,
`python run.py ...` in a checkout (Hydra; the config tree is kr3.config.CONFIG_DIR)."""

import atexit
import importlib
import logging
import os
import shutil
import sys
import time
from contextlib import suppress
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

from kr3.atomic import replacing
from kr3.config import (
    BESIDE_CHECKPOINT,
    CONFIG_DIR,
    check_key,
    compose,
    config_keys,
    override_key,
    quote_free_text,
    register_resolvers,
    within,
)
from kr3.errors import Diverged, UserError, check_values, first_line
from kr3.tracking import write_result

log = logging.getLogger(__name__)
register_resolvers()  # here, not in main(): submitit's job processes import this module, then run a job

# stage -> module whose run(cfg) does it; imported lazily so `stage=prepare` never imports torch
JOB_FILES = ".hydra"  # a run folder's copy of its config, Hydra's config and its overrides (save_job_files)
STAGES = {name: f"kr3.stages.{name}" for name in ("prepare", "train", "generate", "evaluate", "export", "serve", "report")}


class JobFailed(CompactHydraException):
    """A job of a sweep that failed (already printed, and in its result.json): Hydra's sweepers see a failed job, kr3's
    go on to the next (hydra_plugins/kr3_sweepers)."""


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run_stage(cfg: DictConfig):
    try:
        save_job_files(cfg)
        if cfg.stage not in STAGES:
            raise UserError(f"stage={cfg.stage} is not a stage — use one of: {', '.join(STAGES)}")
        check_values("", cfg, {"seed": ("int", 0, 2**63 - 1, False)})
        return objective(importlib.import_module(STAGES[cfg.stage]).run(cfg))
    except MissingMandatoryValue as e:
        stop(f"{e.full_key} is required — add {e.full_key}=... to the command")
    except (ConfigAttributeError, ConfigKeyError) as e:
        removed = removed_by(e.full_key)
        if removed is None:
            crash(e)
        stop(f"{e.full_key} is read by stage={cfg.stage}, and ~{removed} removed it — give it a value (null where "
             "allowed) instead of removing it")
    except UserError as e:
        stop(str(e), recorded=isinstance(e, Diverged))  # the trainer wrote a diverged run's result.json
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        crash(e)


def save_job_files(cfg: DictConfig) -> None:
    """The run folder's .hydra/ (config.yaml, hydra.yaml, overrides.yaml) as Hydra writes them, but each written whole
    (a full disk gave a traceback and an empty file): conf/hydra/default.yaml turns Hydra's own writing off."""
    hydra_cfg = HydraConfig.instance().cfg
    folder = Path(hydra_cfg.hydra.runtime.output_dir) / JOB_FILES
    for name, content in {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}.items():
        with replacing(folder / name) as tmp:
            tmp.write_text(OmegaConf.to_yaml(content), encoding="utf-8")


def stop(message: str, recorded: bool = False):
    """A user error ends this job: one line, exit status 2, and no run folder left if it did no work. In a sweep it is
    the job's failure, not the sweep's: its result.json says why (unless the stage `recorded` it) and the sweep goes on
    — except under torchrun, where every rank runs the sweep and a rank going on alone would pair its collectives
    with another job's: there the first failed job ends the sweep."""
    if not in_sweep() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        discard_empty_run_folder()
        fail(message)
    print(f"error: {message}", file=sys.stderr)
    if not recorded:
        with suppress(UserError):  # a full disk: the sweep's summary still names the job
            write_result(Path(HydraConfig.get().runtime.output_dir), {"state": "failed", "error": message})
    raise JobFailed(message)


def crash(e: Exception):
    """A bug (no user error): its traceback, as ever. In a sweep, into the job's run.log too, and it is that job's
    failure (see stop)."""
    if not in_sweep():
        raise e
    log.exception("the job failed")
    stop(f"{type(e).__name__}: {first_line(e)}")


def in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def removed_by(key: str) -> str | None:
    """The `~key` override of this command that removed `key` (or a section holding it), if any."""
    for override in HydraConfig.get().overrides.task:
        removed = override_key(override)
        if override.startswith("~") and within(key, removed):
            return removed
    return None


def objective(result):
    """What a sweeper minimizes: a stage's final val bits per character when it has one (train, evaluate)."""
    return result["bpc"] if isinstance(result, dict) and "bpc" in result else result


def discard_empty_run_folder():
    """A command that failed before doing any work leaves no run folder: one holding only Hydra's own files."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {JOB_FILES, f"{HydraConfig.get().job.name}.log"}:
        shutil.rmtree(folder, ignore_errors=True)
        # the folder kr3 chose, not hydra.run.dir's: outputs/<date>/ or <run>/<stage>/ if now empty (another run
        # may just have made its folder there)
        chosen = "hydra.run.dir" not in map(override_key, HydraConfig.get().overrides.hydra)
        if chosen and (folder.parent.parent.name == "outputs" or folder.parent.name in BESIDE_CHECKPOINT):
            with suppress(OSError):
                folder.parent.rmdir()


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    """The `kr3` console script and run.py."""
    # one start time for the processes this command starts (submitit's jobs), so they share the sweep folder
    os.environ.setdefault("KR3_RUN_TIME", repr(time.time()))
    logging.raiseExceptions = False  # a run.log on a full disk: the console still shows each line, without tracebacks
    sys.argv = quote_free_text(sys.argv)
    try:
        check_overrides(sys.argv[1:])
    except UserError as e:
        fail(str(e))
    if {"WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & os.environ.keys():  # perhaps under torchrun: join before Hydra
        from kr3 import distributed  # picks the run folder (distributed.launched decides); `--help` needs no torch

        distributed.init()
        atexit.register(distributed.teardown)
    run_stage()


def check_overrides(argv: list[str]):
    """Hydra runs `+trainer.lrr=1` with the typo ignored (and suggests that `+` for `trainer.lrr=1`), and answers
    `model=huge` in several lines. kr3 reads no key that conf/ lacks, so both are typos: one line naming the known
    ones. A value of another kind than its default (`model.n_layers=abc`) and bad syntax are one line too. Hydra's
    own keys and runs that bring their own config (-cn, -cd, ...) are left to Hydra."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = get_args_parser().parse_args(argv)  # Hydra's own parser: flags that take a value read as Hydra reads them
    if any((args.help, args.hydra_help, args.shell_completion, args.info, args.experimental_rerun,
            args.config_path, args.config_name, args.config_dir)):
        return
    parser, overrides = OverridesParser.create(), []
    for line in args.overrides:
        try:
            parsed = parser.parse_overrides([line])
        except OverrideParseException as e:
            reason = "; ".join(x for x in str(e).splitlines() if not x.startswith(("Error parsing", "See ")))
            raise UserError(f"cannot read the override {line!r} ({reason}) — write key=value; quote a value with "
                            "spaces or brackets for Hydra and the shell: \"key='[a b'\"") from None
        check_search_space(line)
        overrides += [o for o in parsed if not o.is_hydra_override()]
    groups = {o.key_or_group: group_choices(o) for o in overrides if (CONFIG_DIR / o.key_or_group).is_dir()}
    keys = [o for o in overrides if o.key_or_group not in groups]
    defaults = composed(groups) if keys else None
    if defaults:  # None: the config does not compose, and Hydra will say why
        known = config_keys(OmegaConf.to_container(defaults))
        for o in keys:
            check_key(o.key_or_group, o.is_add(), known)
            check_kind(o, defaults)


def check_search_space(line: str) -> None:
    """`hydra.sweeper.params.trainer.lr=...` cannot work (Hydra sweeps none of its own keys, and params' keys hold
    dots): on the command line a key's sweep is its search space."""
    key, _, value = line.partition("=")
    key = key.lstrip("+~")
    if key.startswith("hydra.sweeper.params."):
        own = key.removeprefix("hydra.sweeper.params.")
        raise UserError(f"{key} cannot be set on the command line — give the search space as the key's own sweep: "
                        f"'{own}={value}' (hydra.sweeper.params is for a search-space YAML file)")


def group_choices(override) -> list[str]:
    """The group overrides this one stands for (one per option of a sweep `model=tiny,base`), options checked."""
    from hydra.core.override_parser.types import ValueType

    listed = (ValueType.ELEMENT, ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP)
    if override.is_delete() or override.value_type not in listed or override.value() is None:
        return [override.input_line]  # a deletion, `=null`, or a glob/range sweep: Hydra knows what they mean
    group = override.key_or_group
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    for value in values:
        if value not in options:
            raise UserError(f"{group}={value} is not an option of {group}/ — use one of: {', '.join(options)}")
    return [f"{override.get_key_element()}={value}" for value in values]


def composed(groups: dict[str, list[str]]) -> DictConfig | None:
    """The config these group choices compose; for a sweep over a group (`model=tiny,base`), every
    option's merged into it (the first option's values win). None when it does not compose: Hydra will say why."""
    from hydra.errors import HydraException

    first = {group: choices[0] for group, choices in groups.items()}
    variants = [first, *({**first, group: c} for group, choices in groups.items() for c in choices[1:])]
    try:
        trees = [OmegaConf.create(OmegaConf.to_container(compose(list(v.values())))) for v in variants]
    except (HydraException, ValueError):  # ValueError: Hydra's own, for `experiment=null`
        return None
    return OmegaConf.merge(*reversed(trees))


def check_kind(override, defaults: DictConfig) -> None:
    """`model.n_layers=abc` or `data.clean.nfc=maybe` would fail deep in a stage, or pass unseen: a value (each of a
    sweep) must be of its default's kind — a flag, a number, a list (or one string) — or null. Defaults that are
    null or text take any value; interpolations (`${...}`) are left to OmegaConf."""
    from hydra.core.override_parser.types import ValueType

    if override.is_delete() or override.value_type in (ValueType.INTERVAL_SWEEP, ValueType.GLOB_CHOICE_SWEEP):
        return
    default = OmegaConf.select(defaults, override.key_or_group)
    # an int default may stand for a number (rating_loss: 0): whether a value must be whole is the stage's check;
    # a list may be given as one string ("generate.stop='!'" in a shell)
    kinds = {bool: ("true or false", (bool,)), int: ("a number", (int, float)), float: ("a number", (int, float)),
             list: ("a list, e.g. [1,2]", (list, str))}
    name, accepted = next((v for k, v in kinds.items() if type(default) is k or (k is list and OmegaConf.is_list(default))),
                          (None, None))
    if name is None:
        return
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    for value in values:
        if value is None or (isinstance(value, str) and value.startswith("${")):
            continue
        if not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool)):
            shown = value if override.is_sweep_override() else override.input_line.split("=", 1)[1]  # as typed
            raise UserError(f"{override.key_or_group}={shown} must be {name} (its default: "
                            f"{str(default).lower() if isinstance(default, bool) else default})")
