"""kr3 entry point: `python run.py stage=prepare|...` (Hydra; see conf/)."""

import atexit
import importlib
import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from kr3.config import quote_free_text, register_resolvers
from kr3.errors import UserError

register_resolvers()

# stage -> module whose run(cfg) does it; imported lazily so `stage=prepare` never imports torch
STAGES = {name: f"kr3.stages.{name}" for name in ("prepare", "train", "generate", "evaluate")}


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    try:
        if cfg.stage not in STAGES:
            raise UserError(f"stage={cfg.stage} is not a stage — use one of: {', '.join(STAGES)}")
        return importlib.import_module(STAGES[cfg.stage]).run(cfg)
    except MissingMandatoryValue as e:
        fail(f"{e.full_key} is required — add {e.full_key}=... to the command")
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.argv = quote_free_text(sys.argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: join before Hydra picks the run folder
        from kr3 import distributed

        distributed.init()
        atexit.register(distributed.teardown)
    main()
