# The sandbox image where a registry is reachable (scripts/docker-setup.sh builds the same image
# offline with debootstrap): Debian bookworm, python3, git, procps (pgrep/ps), coreutils `timeout`.
#   docker build -t klong-sandbox:bookworm -f scripts/sandbox.Dockerfile scripts
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 git procps ca-certificates \
    && rm -rf /var/lib/apt/lists/*
CMD ["bash"]
