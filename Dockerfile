# The worknode services (worknode node, worknode healer) in one image.
# Build: docker build -t worknode:local .   (docker-compose.yml builds it for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY services ./services
COPY schemas ./schemas
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/worknode worknode \
    && mkdir -p /var/lib/worknode/state /var/lib/worknode/keys \
    && chown -R worknode /var/lib/worknode
COPY deploy/keygen.py deploy/compose-keys.sh deploy/demo_writer.py deploy/nats.conf.template /usr/local/lib/worknode/

USER worknode
WORKDIR /var/lib/worknode
# worknode node serves /metrics on 9464, the healer on 9465 (see docker-compose.yml).
EXPOSE 9464 9465
ENTRYPOINT ["worknode"]
CMD ["node"]
