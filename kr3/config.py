"""Hydra/OmegaConf glue shared by the command (kr3.cli) and the tests."""

import difflib
import os
import re
import shlex
import shutil
import sys
import time
from datetime import datetime
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from kr3.errors import UserError

_CHECKOUT = Path(__file__).resolve().parent.parent
_IN_CHECKOUT = (_CHECKOUT / "conf" / "config.yaml").is_file()
# the project folder (data/, outputs/, multirun/ go under it): the checkout where conf/ and run.py live, or, for an
# installed kr3 (`pip install .`), the folder the command runs in; the wheel carries conf/ as kr3/conf
ROOT = _CHECKOUT if _IN_CHECKOUT else Path.cwd()
CONFIG_DIR = _CHECKOUT / "conf" if _IN_CHECKOUT else Path(__file__).resolve().parent / "conf"


@cache
def default_block(name: str):
    """A top-level block of conf/config.yaml as written, as its settings (kr3.settings: Generate, Serve), for the
    Python API and the server's defaults (not compose(): it cannot run inside a Hydra app)."""
    from typing import get_type_hints

    from kr3 import settings

    schema = get_type_hints(settings.Settings)[name]
    block = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"), resolve=True)[name]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), block))


_STARTED = time.time()


def run_time(fmt: str) -> str:
    """Like Hydra's ${now:...}, but one instant per job: under torchrun every rank gets rank 0's
    (distributed.init sets KR3_RUN_TIME), so all ranks write into the same run folder."""
    return datetime.fromtimestamp(float(os.environ.get("KR3_RUN_TIME", _STARTED))).strftime(fmt)


def register():
    """What Hydra composes kr3's config with: its resolvers and its settings' schemas (kr3.settings)."""
    from kr3 import settings

    settings.register()
    OmegaConf.register_new_resolver("kr3_root", lambda: str(ROOT), replace=True)
    OmegaConf.register_new_resolver("kr3_time", run_time, replace=True)
    OmegaConf.register_new_resolver("kr3_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("kr3_output_dir", output_dir, replace=True)


BESIDE_CHECKPOINT = ("evaluate", "generate", "export")  # stages whose run folder is in the checkpoint's run


def run_dir(stage: str, checkpoint, log_dir: str) -> str:
    """The run folder: evaluate, generate and export write beside the checkpoint they read, into
    `<its run>/<stage>/<date>_<time>`, where its results are found; the rest into outputs/<date>/<time>."""
    if stage in BESIDE_CHECKPOINT and checkpoint is not None:
        from kr3 import checkpoint as ckpt

        try:
            return str(ckpt.run_folder(ckpt.locate(checkpoint, log_dir).resolve()) / stage / run_time("%Y-%m-%d_%H-%M-%S"))
        except UserError:
            pass  # the stage says what is wrong with it
    return f"{log_dir}/outputs/{run_time('%Y-%m-%d')}/{run_time('%H-%M-%S')}"


def output_dir(stage: str, checkpoint, log_dir: str) -> str:
    """This job's run folder: Hydra's; for a config composed outside a Hydra app (compose()), the one it would get."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else run_dir(stage, checkpoint, log_dir)


def as_list(value) -> list:
    """A setting given as one value or a list of them (generate.stop, trainer.sample_prompts), as a list: one string
    is one item, not its characters; null is none."""
    if value is None:
        return []
    return list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [value]


def override_key(override: str) -> str:
    """The key an override sets: `trainer.lr` of `trainer.lr=1`, `+trainer.x=1` or `~trainer.lr`."""
    return override.lstrip("+~").split("=", 1)[0]


def within(key: str, section: str) -> bool:
    """Whether `key` is `section` or a key inside it."""
    return key == section or key.startswith(section + ".")


def quote_free_text(argv: list[str]) -> list[str]:
    """`generate.prompt=이 집 짜장면은` as typed: Hydra's override grammar takes no Korean unquoted, so a prompt
    not already quoted is quoted here (quotes, the backslashes before them, and `${` escaped)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"')
        if eq and key.lstrip("+") == "generate.prompt" and not quoted and value != "null":
            value = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value).replace("${", "\\${")
            value = "'" + re.sub(r"(\\+)$", lambda m: m[1] * 2, value) + "'"
        out.append(f"{key}={value}" if eq else arg)
    return out


def compose(overrides=(), root: str | Path | None = None):
    """The config `run.py` builds from these overrides, without running a stage (for tests and notebooks).
    `root` moves the project folder (data/, outputs/, multirun/) elsewhere."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config",
                             overrides=[*([f"paths.root_dir={root}"] if root is not None else []), *overrides])


def config_keys(tree: dict, prefix: str = "") -> set[str]:
    """Every dotted key of a config as a dict, sections included (`trainer`, `trainer.lr`)."""
    keys = set()
    for name, value in tree.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= config_keys(value, f"{prefix}{name}.")
    return keys


def check_key(key: str, added: bool, known: set[str]):
    if added and key in known:  # Hydra: "Could not append to config. An item is already at ..."
        raise UserError(f"{key} is already in the config — set it without the +: {key}=...")
    if key in known:
        return
    if options := options_holding(key):
        group = key.split(".", 1)[0]
        listed = " and ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        raise UserError(f"{key} is not a setting of the {group} chosen here — {listed} "
                        f"{'has' if len(options) == 1 else 'have'} it")
    leaf = key.rsplit(".", 1)[-1]
    same_depth = [k for k in known if k.count(".") == key.count(".")]  # `trainer.lrr`: not the section `trainer`
    near = [k for k in sorted(known) if k.rsplit(".", 1)[-1] == leaf] + difflib.get_close_matches(key, same_depth, n=3)
    hint = f"did you mean {' or '.join(list(dict.fromkeys(near))[:3])}?" if near else "--cfg job prints every key"
    raise UserError(f"{key} is not a kr3 setting — {hint}")


def options_holding(key: str) -> list[str]:
    """`model=pretrained` for `model.name_or_path`: the options of the key's config group whose files set it (those
    packaged under the group; `defaults` is Hydra's list, no setting)."""
    group, _, rest = key.partition(".")
    if not rest or rest.split(".")[0] == "defaults" or not (CONFIG_DIR / group).is_dir():
        return []
    found = []
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        if "@package" in path.read_text().split("\n", 1)[0]:
            continue  # `# @package _global_`: its keys are not under the group
        node = OmegaConf.select(OmegaConf.load(path), rest, default=_ABSENT, throw_on_resolution_failure=False)
        if node is not _ABSENT:
            found.append(f"{group}={path.stem}")
    return found


_ABSENT = object()


def command_overrides() -> list[str] | None:
    """The overrides typed on the command line, or None when the config was built in Python."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def started_as() -> str:
    """The command that started this process, for a hint to paste: `uv run python run.py`, `kr3`, `.venv/bin/python
    run.py`, `torchrun --standalone --nproc_per_node=2 --no-python kr3`, …"""
    script = sys.argv[0] if Path(sys.argv[0]).name in ("run.py", "kr3") else "kr3"  # else a notebook, a test, …
    console = not script.endswith(".py")  # the installed `kr3` command
    program = tool_command(Path(script).name) if console else [*python_command(), script]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return shlex.join([*tool_command("torchrun"), *torchrun_options(), *(["--no-python"] if console else []),
                           program[-1]])
    return shlex.join(program)


def torchrun_options() -> list[str]:
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        return ["--standalone", f"--nproc_per_node={local}"]
    return [f"--nnodes={world // local}", f"--nproc_per_node={local}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={os.environ.get('MASTER_ADDR', 'HOST')}:{os.environ.get('MASTER_PORT', 'PORT')}"]


def python_command() -> list[str]:
    """This Python as it can be typed: through uv under `uv run`, `python` when that is this one, else its path (a
    virtual environment not activated)."""
    if "UV_RUN_RECURSION_DEPTH" in os.environ:
        return ["uv", "run", "python"]
    on_path = shutil.which("python")
    return ["python"] if on_path and Path(on_path).absolute() == Path(sys.executable).absolute() else [sys.executable]


def tool_command(name: str) -> list[str]:
    """A console script of this environment (`kr3`, `wandb`, `torchrun`) as it can be typed: through uv under `uv
    run`, by name when PATH finds this environment's, else by path."""
    if "UV_RUN_RECURSION_DEPTH" in os.environ:
        return ["uv", "run", name]
    beside = Path(sys.executable).parent / name
    found = shutil.which(name)
    return [name if not beside.exists() or (found and Path(found).absolute() == beside.absolute()) else str(beside)]
