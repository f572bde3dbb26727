"""stage=serve: a checkpoint behind an OpenAI-compatible HTTP API and a page (kr3.serve), until Ctrl-C.

    python run.py stage=serve checkpoint=latest serve.port=8000"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kr3 import api, hardware, serve
from kr3.errors import UserError, check_values
from kr3.sampling import decoding

log = logging.getLogger(__name__)
LIMITS = ("max_body_bytes", "max_tokens", "max_n", "max_prompts", "max_next_tokens", "max_active")


def check_serve(s) -> None:
    check_values("serve", s, {"port": ("int", 0, 65535, False), **{k: ("int", 1, None, False) for k in LIMITS}})
    if not str(s.model_name).strip():
        raise UserError("serve.model_name is empty — give the id /v1/models should list, e.g. serve.model_name=kr3")


def run(cfg) -> None:
    s = cfg.serve
    check_serve(s)
    sock = serve.listen(str(s.host), int(s.port))  # before loading: a port in use is said at once
    key = api_key(s)
    if key:
        redact(Path(cfg.paths.output_dir) / ".hydra", key)
    hardware.setup(s.device, s.precision)
    m = api.load(cfg.checkpoint, s.device, s.precision, cfg.paths.log_dir, **decoding(cfg.generate))
    limits = serve.Limits(**{k: int(s[k]) for k in LIMITS})
    log.info(f"checkpoint {m.path}: step {m.checkpoint.step}, {m.model.num_params() / 1e6:.2f}M parameters, {m.device}, "
             f"{str(m.dtype).replace('torch.', '')}; ratings: {', '.join(m.ratings or ['none'])}")
    log.info(f"serving {serve.url(sock)} (the page) and {serve.url(sock)}v1 as model {s.model_name!r}"
             f"{'; API key required' if key else ''}; Ctrl-C stops")
    serve.run(serve.app(m, limits, key, str(s.model_name)), sock)


def api_key(s) -> str | None:
    """serve.api_key, else the KR3_API_KEY environment variable — read here, not interpolated into the config, where
    a stage that saves its resolved config (a checkpoint, W&B) would write it down."""
    key = os.environ.get("KR3_API_KEY") if s.api_key is None else str(s.api_key)
    if key is not None and not key.strip():
        raise UserError("the API key is empty (serve.api_key or KR3_API_KEY) — give a key, or unset it to serve without one")
    return key


def redact(folder: Path, key: str) -> None:
    """A key given as serve.api_key=… is in Hydra's copy of the command (overrides.yaml, config.yaml): blank it
    there, so the run folder never holds it. KR3_API_KEY is not copied at all."""
    for path in folder.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        if key in text:
            path.write_text(text.replace(key, "<redacted>"), encoding="utf-8")
