# syntax=docker/dockerfile:1
# kr3 on a CUDA machine: `docker build -t kr3 .` then `docker run --gpus all ... kr3 stage=...` (see README).
# The PyPI torch wheel carries its own CUDA runtime (CUDA 13.x): the host needs only an NVIDIA driver >= 580.
FROM python:3.11-slim
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /uvx /bin/
# not root: uid 1000, usually the host's first user, so the data/ and outputs/ it writes through mounts stay yours
RUN useradd --create-home --uid 1000 kr3 && mkdir /app && chown kr3:kr3 /app
USER kr3
WORKDIR /app
ENV UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 PYTHONUNBUFFERED=1 PATH=/app/.venv/bin:$PATH
# dependencies first, so code edits do not reinstall torch; downloads stay in a build cache, out of the image
COPY --chown=kr3:kr3 pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/home/kr3/.cache/uv,uid=1000,gid=1000 \
    uv sync --frozen --no-dev --no-install-project
COPY --chown=kr3:kr3 conf ./conf
COPY --chown=kr3:kr3 kr3 ./kr3
COPY --chown=kr3:kr3 hydra_plugins ./hydra_plugins
COPY --chown=kr3:kr3 run.py ./
RUN --mount=type=cache,target=/home/kr3/.cache/uv,uid=1000,gid=1000 \
    uv sync --frozen --no-dev
# data/, outputs/ and multirun/ live under /app: mount them to keep results
ENTRYPOINT ["kr3"]
CMD ["stage=prepare"]
