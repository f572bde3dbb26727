"""kr3 in a checkout: `python run.py stage=<prepare|train|generate|evaluate|export|serve|report> [overrides]` — the
same as the installed `kr3` command (kr3/cli.py; Hydra config in conf/)."""

from kr3.cli import main

if __name__ == "__main__":
    main()
