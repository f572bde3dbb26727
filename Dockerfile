# syntax=docker/dockerfile:1
# kr3's image, in two flavours of the same code and locked dependencies (docs/docker.md):
#   docker build -t kr3 .                   NVIDIA GPUs: torch as uv.lock has it, with its own CUDA runtime (the
#                                           host needs only an NVIDIA driver >= 580); the CUDA libraries take ~5 GB
#   docker build --target cpu -t kr3:cpu .  CPUs only: the CPU build of the same torch version, no CUDA libraries
FROM python:3.11-slim AS base
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /uvx /bin/
# not root: uid 1000, usually the host's first user, so the data/ and outputs/ it writes through mounts stay yours
RUN useradd --create-home --uid 1000 kr3 && mkdir /app && chown kr3:kr3 /app
USER kr3
WORKDIR /app
ENV UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/app/.venv PATH=/app/.venv/bin:$PATH
# dependencies first, so code edits do not reinstall torch; downloads stay in a build cache, out of the image
COPY --chown=kr3:kr3 pyproject.toml uv.lock README.md ./
# stage=serve's port (run it with serve.host=0.0.0.0 and publish it: -p 127.0.0.1:8000:8000)
EXPOSE 8000
# data/, outputs/ and multirun/ live under /app: mount them to keep results
ENTRYPOINT ["kr3"]
CMD ["stage=prepare"]

FROM base AS cpu
# the locked requirements without torch's CUDA builds (torch, triton, nvidia-*), then torch's CPU build of the
# locked version from PyTorch's CPU index (`torch==2.15.0` takes `2.15.0+cpu`)
RUN --mount=type=cache,target=/home/kr3/.cache/uv,uid=1000,gid=1000 \
    uv export --quiet --frozen --no-dev --extra hf --no-hashes --no-emit-project -o /tmp/locked.txt \
    && grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' /tmp/locked.txt > /tmp/cpu.txt \
    && grep -E '^torch==' /tmp/locked.txt > /tmp/torch.txt \
    && uv venv /app/.venv && uv pip install -r /tmp/cpu.txt \
    && uv pip install --no-deps --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt
COPY --chown=kr3:kr3 conf ./conf
COPY --chown=kr3:kr3 kr3 ./kr3
COPY --chown=kr3:kr3 hydra_plugins ./hydra_plugins
COPY --chown=kr3:kr3 run.py ./
RUN uv pip install --no-deps -e .

FROM base AS cuda
RUN --mount=type=cache,target=/home/kr3/.cache/uv,uid=1000,gid=1000 \
    uv sync --frozen --no-dev --extra hf --no-install-project
COPY --chown=kr3:kr3 conf ./conf
COPY --chown=kr3:kr3 kr3 ./kr3
COPY --chown=kr3:kr3 hydra_plugins ./hydra_plugins
COPY --chown=kr3:kr3 run.py ./
RUN --mount=type=cache,target=/home/kr3/.cache/uv,uid=1000,gid=1000 \
    uv sync --frozen --no-dev --extra hf
