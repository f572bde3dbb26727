# kr3 on a CUDA machine: `docker build -t kr3 .` then `docker run --gpus all ... kr3 stage=...` (see README).
# The PyPI torch wheel carries its own CUDA runtime; the host needs only the NVIDIA driver.
FROM python:3.11-slim
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /uvx /bin/
ENV UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# dependencies first, so code edits do not reinstall torch
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY conf ./conf
COPY kr3 ./kr3
COPY run.py ./
RUN uv sync --frozen --no-dev
# data/, outputs/ and multirun/ live under /app: mount them to keep results
ENTRYPOINT ["uv", "run", "--frozen", "--no-dev", "python", "run.py"]
CMD ["stage=prepare"]
