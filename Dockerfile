# The triage app image: one image, every `triage` command. docker-compose.yml runs it as the
# init jobs, the scorer (`consume`) and the replay; `docker run IMAGE settings` lists the knobs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The pinned runtime dependencies first, in a layer of their own: they change far less often
# than the code, so a code change rebuilds only the small layers below. Every package here
# ships manylinux wheels (XGBoost brings its own libgomp), so the slim image needs no compiler.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

# The package itself. --no-deps: its dependencies are exactly the pins installed above, never
# whatever pip would resolve from pyproject's ranges. .dockerignore keeps the context to the
# source folders, so no local .venv, data or models end up in the image.
WORKDIR /src
COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

# Run as an unprivileged user. /data and /models are created here, owned by that user, because
# Docker initialises an empty named volume from the image's directory at the mount point,
# ownership included; without this the volumes would be root-owned and unwritable.
RUN useradd --create-home --uid 10001 --user-group triage \
    && mkdir -p /data /models \
    && chown triage:triage /data /models
USER triage
WORKDIR /home/triage

ENTRYPOINT ["triage"]
CMD ["--help"]
