# The engine in a container. Without REDIS_URL it runs its embedded Redis with its data in /data
# (mount a volume there); with REDIS_URL it uses that Redis and starts nothing else.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=3000 \
    DATA_DIR=/data

WORKDIR /app
COPY requirements.txt .
# The engine's own packages only (the section of requirements.txt above its test and lint
# tools), at the versions requirements.txt pins for everything.
RUN sed -n '/^# The engine/,/^# Tests and checks/p' requirements.txt | grep -v '^#' > engine.txt \
    && pip install --no-cache-dir -r engine.txt -c requirements.txt && rm engine.txt

RUN useradd --system --uid 10001 --home-dir /app engine \
    && mkdir -p /data && chown engine /data
COPY engine.py .

USER engine
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"3000\")}/livez', timeout=2)"

# SIGTERM (docker stop) drains in-flight orders for ENGINE_SHUTDOWN_GRACE_S; give it that long
# plus 10 s (docker stop -t, stop_grace_period), or a stalled Redis can get it killed mid-drain.
STOPSIGNAL SIGTERM
CMD ["python", "engine.py"]
