"""The command line's overrides, checked before Hydra runs them: one line for each mistake Hydra would answer in
several (or not at all), through Hydra's public API only. kr3 reads no key that conf/ lacks, so `trainer.lrr=1` and
`+trainer.lrr=1` are typos, `model=huge` is no option, and a value of another type than its setting's
(kr3.settings: `model.n_layers=abc`, `data.clean.nfc=maybe`) is refused — each value of a sweep too. Hydra's own keys
and commands that bring their own config (-cn, -cd, …) are left to Hydra."""

from __future__ import annotations

import argparse
import shlex
import types
import typing
from dataclasses import fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from kr3.config import CONFIG_DIR, check_key, compose, config_keys, started_as
from kr3.errors import UserError

# Hydra's command-line flags (hydra.main's parser) that take a value; those after which Hydra, not kr3, reads the rest
VALUE_FLAGS = {"--cfg": "-c", "--package": "-p", "--config-path": "-cp", "--config-name": "-cn", "--config-dir": "-cd",
               "--experimental-rerun": None}
SWITCHES = {"--help": "-h", "--hydra-help": None, "--version": None, "--resolve": None, "--run": "-r",
            "--multirun": "-m", "--shell-completion": "-sc"}
HYDRA_READS = ("help", "hydra_help", "version", "shell_completion", "info", "experimental_rerun", "config_path",
               "config_name", "config_dir")


def arguments(argv: list[str]) -> argparse.Namespace:
    """The command line as Hydra reads it: its flags, then the overrides."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*")
    for long, short in VALUE_FLAGS.items():
        parser.add_argument(long, *([short] if short else []))
    for long, short in SWITCHES.items():
        parser.add_argument(long, *([short] if short else []), action="store_true")
    parser.add_argument("--info", "-i", nargs="?", const="all")
    return parser.parse_known_args(argv)[0]


def check(argv: list[str]) -> None:
    args = arguments(argv)
    if any(getattr(args, name) for name in HYDRA_READS):
        return
    overrides = [o for line in args.overrides for o in parsed(line) if not o.is_hydra_override()]
    if not args.multirun:
        check_no_sweep(overrides, argv)
    groups = {o.key_or_group: group_choices(o) for o in overrides if (CONFIG_DIR / o.key_or_group).is_dir()}
    keys = [o for o in overrides if o.key_or_group not in groups]
    variants = composed(groups) if keys else []  # none: the config does not compose, and Hydra will say why
    keysets = [config_keys(OmegaConf.to_container(v)) for v in variants]
    for o in keys if variants else []:
        check_key(o.key_or_group, o.is_add(), set().union(*keysets))
        check_removal(o)
        check_type(o, next(v for v, known in zip(variants, keysets) if o.key_or_group in known))
    for o in overrides:
        check_removal(o)


def check_no_sweep(overrides: list, argv: list[str]) -> None:
    """A sweep (`trainer.lr=1e-3,3e-4`) without -m: Hydra's answer is five lines; kr3's is the command with -m."""
    for o in overrides:
        if o.is_sweep_override():
            key = o.get_key_element()
            raise UserError(f"{o.input_line} is a sweep — add -m to run one job per value: {started_as()} -m "
                            f"{shlex.join(argv)} (one value: a list {key}=[a,b], a string with commas {key}='a,b')")


def check_removal(override) -> None:
    """kr3 reads every setting (kr3.settings types them all): removing one (`~trainer`, `~data.clean.min_chars`)."""
    if override.is_delete():
        raise UserError(f"~{override.key_or_group} removes settings kr3 reads — give a value instead (null where "
                        "allowed, or another option of a group)")


def parsed(line: str) -> list:
    """One override as Hydra parses it; bad syntax, and a search space given as hydra.sweeper.params, are one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        result = OverridesParser.create().parse_overrides([line])
    except OverrideParseException as e:
        reason = "; ".join(x for x in str(e).splitlines() if not x.startswith(("Error parsing", "See ")))
        raise UserError(f"cannot read the override {line!r} ({reason}) — write key=value; quote a value with spaces or "
                        "brackets for Hydra and the shell: \"key='[a b'\"") from None
    check_search_space(line)
    return result


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
    if override.value_type not in listed or override.value() is None:
        return [override.input_line]  # `=null`, or a glob/range sweep: Hydra knows what they mean
    group = override.key_or_group
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    for value in values:
        if value not in options:
            raise UserError(f"{group}={value} is not an option of {group}/ — use one of: {', '.join(options)}")
    return [f"{override.get_key_element()}={value}" for value in values]


def composed(groups: dict[str, list[str]]) -> list[DictConfig]:
    """The typed configs these group choices compose: the first option of each, and each other option of a sweep over
    a group (`model=tiny,base`) in turn. None when they do not compose: Hydra will say why."""
    from hydra.errors import HydraException

    first = {group: choices[0] for group, choices in groups.items()}
    variants = [first, *({**first, group: c} for group, choices in groups.items() for c in choices[1:])]
    try:
        return [compose(list(v.values())) for v in variants]
    except (HydraException, ValueError):  # ValueError: Hydra's own, for `experiment=null`
        return []


def check_type(override, defaults: DictConfig) -> None:
    """A value (each value of a sweep) of another type than its setting's, or null where it takes none, is one line.
    Interpolations (`${...}`) are left to OmegaConf."""
    from hydra.core.override_parser.types import ValueType

    if override.value_type in (ValueType.INTERVAL_SWEEP, ValueType.GLOB_CHOICE_SWEEP):
        return
    key = override.key_or_group
    kind, bounds = setting_type(defaults, key)
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    for value in values:
        if not (isinstance(value, str) and value.startswith("${")) and not fits(value, kind):
            shown = value if override.is_sweep_override() else override.input_line.split("=", 1)[1]  # as typed
            default = OmegaConf.select(defaults, key)
            raise UserError(f"{key}={shown} must be {described(kind, bounds)} (its default: "
                            f"{str(default).lower() if isinstance(default, bool) else default})")


def setting_type(config: DictConfig, key: str) -> tuple[object, str]:
    """(the type kr3.settings gives `key`, its range as words: ` ≥ 1`); Any where no schema says."""
    parent, _, leaf = key.rpartition(".")
    schema = OmegaConf.get_type(OmegaConf.select(config, parent) if parent else config)
    if not is_dataclass(schema):
        return typing.Any, ""
    field = next((f for f in fields(schema) if f.name == leaf), None)
    if field is None:
        return typing.Any, ""
    limits = field.metadata or {}
    words = [f"≥ {limits['low']}" if limits.get("low") is not None else "",
             f"> {limits['above']}" if limits.get("above") is not None else "",
             f"≤ {limits['high']}" if limits.get("high") is not None else ""]
    bounds = " and ".join(w for w in words if w)
    return typing.get_type_hints(schema)[leaf], f" {bounds}" if bounds else ""


def fits(value, kind) -> bool:
    """Whether an override's value (as Hydra parsed it) is of type `kind`: a number is no text, a bool no number."""
    if kind is typing.Any or is_dataclass(kind):
        return True
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        return type(None) in options
    return any(fits_one(value, option) for option in options if option is not type(None))


def fits_one(value, kind) -> bool:
    base = typing.get_origin(kind) or kind
    if base is list:
        (item,) = typing.get_args(kind) or (typing.Any,)
        return isinstance(value, list) and all(fits(v, item) for v in value)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is str:
        return not isinstance(value, list | dict)
    return True


def described(kind, bounds: str = "") -> str:
    """`an integer ≥ 1, or null`, `a list of numbers, e.g. [1,2]`, … for one line."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    words = [f"a list of {plural(typing.get_args(o))}, e.g. [1,2]" if typing.get_origin(o) is list else names.get(o, str(o))
             for o in options if o is not type(None)]
    return " or ".join(words) + bounds + (", or null" if type(None) in options else "")


def plural(args: tuple) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(args[0] if args else None, "values")
