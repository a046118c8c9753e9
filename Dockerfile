# turnrelay: one image for every role (api, executor, migrate, serve).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 10001 turnrelay \
    && mkdir -p /srv/sandbox /srv/storage && chown turnrelay /srv/sandbox /srv/storage
USER turnrelay
WORKDIR /home/turnrelay
EXPOSE 8000 8008
ENTRYPOINT ["turnrelay"]
# Without TURNRELAY_API_KEYS this refuses to start (exit 2): every caller would be
# the same local user, able to read and delete every chat. Set the keys, or run
# another role (`executor`, `migrate`, `serve --host 127.0.0.1`).
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
