"""stage=serve: a checkpoint behind an OpenAI-compatible HTTP API and a page (kr3.serve), until Ctrl-C.

    python run.py stage=serve checkpoint=latest serve.port=8000"""

from __future__ import annotations

import logging
from pathlib import Path

from kr3 import api, hardware, serve, settings
from kr3.errors import UserError
from kr3.sampling import decoding

log = logging.getLogger(__name__)


def check_serve(s) -> None:
    if not str(s.model_name).strip():
        raise UserError("serve.model_name is empty — give the id /v1/models should list, e.g. serve.model_name=kr3")


def run(cfg) -> None:
    cfg = settings.typed(cfg)
    s = cfg.serve
    check_serve(s)
    sock = serve.listen(str(s.host), int(s.port))  # before loading: a port in use is said at once
    key = serve.api_key(s)
    if key:
        serve.redact(Path(cfg.paths.output_dir) / ".hydra", key)
    hardware.setup(s.device, s.precision, s.threads)
    m = api.load(cfg.checkpoint, s.device, s.precision, cfg.paths.log_dir, **decoding(cfg.generate))
    limits = serve.Limits.of(s)
    log.info(f"{m.describe()}; ratings: {', '.join(m.ratings or ['none'])}")
    log.info(f"serving {serve.url(sock)} (the page) and {serve.url(sock)}v1 as model {s.model_name!r}"
             f"{'; API key required' if key else ''}; Ctrl-C stops")
    serve.run(serve.app(m, limits, key, str(s.model_name)), sock)
