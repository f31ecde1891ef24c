# SD Studio: self-hosting image. Build: docker build -t sdstudio .
# Run:   docker run --gpus all -p 7860:7860 -v sdstudio-cache:/home/studio/.cache sdstudio
#        docker run ... sdstudio --model demo --auth-file /run/secrets/users   (flags are appended)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    SDSTUDIO_OUTPUT_DIR=/home/studio/outputs

RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 studio
WORKDIR /home/studio/app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY --chown=studio:studio . .
USER studio

EXPOSE 7860
# "/" answers 200 with or without --auth (the login page), so the check works in both modes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:7860/ || exit 1

# --listen and the port are in the entrypoint so that flags given to `docker run` add to them.
ENTRYPOINT ["python", "app.py", "--listen", "--port", "7860"]
CMD []
