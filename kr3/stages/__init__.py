"""The stages `run.py stage=...` runs: each reads its config, calls the library (kr3.*) and reports. A stage
imports no other stage, and the library imports no stage (import-linter contracts in pyproject.toml)."""
