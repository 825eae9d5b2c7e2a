#!/usr/bin/env bash
# Docker for the sandbox's Docker backend, offline (issue 19): engine, daemon, image. Idempotent:
# every step is skipped when its result is already there, so CI can call it on every run.
#
#   scripts/docker-setup.sh          # install (root + apt), start dockerd, build the image
#   scripts/docker-setup.sh --stop   # stop the dockerd this script started (CI, at the end)
#
# 1. Engine: `apt-get install docker.io debootstrap` (root, Debian/Ubuntu) when dockerd is missing.
# 2. Daemon: when no engine answers, `dockerd` in the background, logging to $KLONG_DOCKERD_LOG;
#    its PID goes to $KLONG_DOCKERD_PID (for --stop); waits until `docker info` answers.
# 3. Image: the backend's default image (sandbox.DEFAULT_IMAGE, or $KLONG_SANDBOX_IMAGE) built
#    offline from Debian's packages, as no registry is reachable here:
#      debootstrap --variant=minbase --include=python3,git,procps bookworm ROOT   (~45 s)
#      tar -C ROOT -c . | docker import - IMAGE                                   (~2 s)
#    The root's tar is kept in $KLONG_IMAGE_CACHE (/var/cache/klong): a lost image re-imports.
#    Where a registry is reachable, the same image builds from scripts/sandbox.Dockerfile:
#      docker build -t klong-sandbox:bookworm -f scripts/sandbox.Dockerfile scripts
#    (set KLONG_IMAGE_BUILD=dockerfile to make this script do that instead).
# Exit status 0 when the engine answers and the image exists; otherwise 1 with one line saying
# why (the Docker tests then skip with that reason).
set -uo pipefail
IMAGE=${KLONG_SANDBOX_IMAGE:-klong-sandbox:bookworm}
LOG=${KLONG_DOCKERD_LOG:-/tmp/klong-dockerd.log}
PIDFILE=${KLONG_DOCKERD_PID:-/tmp/klong-dockerd.pid}
SUITE=${KLONG_IMAGE_SUITE:-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "docker-setup: $*" >&2; }
fail() { say "$*"; exit 1; }

if [[ "${1:-}" == "--stop" ]]; then
  if [[ -s "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    pid=$(cat "$PIDFILE")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped dockerd ($pid)"
  fi
  rm -f "$PIDFILE"
  exit 0
fi

answers() { timeout 20 docker info >/dev/null 2>&1; }

# 1. the engine
if ! answers && ! command -v dockerd >/dev/null; then
  [[ $(id -u) == 0 ]] || fail "no Docker engine, and installing one needs root"
  command -v apt-get >/dev/null || fail "no Docker engine, and no apt-get to install one"
  say "installing docker.io and debootstrap (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap) \
    >/tmp/klong-docker-apt.log 2>&1 || fail "apt-get install docker.io failed (see /tmp/klong-docker-apt.log)"
fi
command -v docker >/dev/null || fail "no docker client on PATH"

# 2. the daemon
if ! answers; then
  [[ $(id -u) == 0 ]] || fail "no Docker engine answers, and starting dockerd needs root"
  say "starting dockerd (log: $LOG)"
  nohup dockerd >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 120); do
    answers && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || fail "dockerd exited: $(tail -3 "$LOG" | tr '\n' ' ')"
    sleep 0.5
  done
  answers || fail "dockerd did not answer within 60 s (see $LOG)"
fi

# 3. the image
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "image $IMAGE is there"
  exit 0
fi
if [[ "${KLONG_IMAGE_BUILD:-debootstrap}" == dockerfile ]]; then
  say "building $IMAGE from scripts/sandbox.Dockerfile (needs a registry)"
  docker build -q -t "$IMAGE" -f "$HERE/sandbox.Dockerfile" "$HERE" >/dev/null \
    || fail "docker build of $IMAGE failed (no registry reachable? use the debootstrap path)"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || fail "image $IMAGE missing and no debootstrap to build it"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap) \
    >/tmp/klong-docker-apt.log 2>&1 || fail "apt-get install debootstrap failed"
fi
CACHE=${KLONG_IMAGE_CACHE:-/var/cache/klong}/$(echo "$IMAGE" | tr ':/' '__').tar
if [[ ! -s "$CACHE" ]]; then             # the root file system, kept: a lost image re-imports in ~2 s
  ROOT=$(mktemp -d /tmp/klong-image-root.XXXXXX)
  trap 'rm -rf "$ROOT"' EXIT
  say "building $IMAGE offline: debootstrap $SUITE (~45 s on a fast mirror)"
  debootstrap --variant=minbase --include=python3,git,procps "$SUITE" "$ROOT" \
    >/tmp/klong-debootstrap.log 2>&1 || fail "debootstrap failed (see /tmp/klong-debootstrap.log)"
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
  mkdir -p "$(dirname "$CACHE")"
  tar -C "$ROOT" -cf "$CACHE.partial" . && mv "$CACHE.partial" "$CACHE" || fail "cannot write $CACHE"
fi
docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["bash"]' "$CACHE" "$IMAGE" >/dev/null || fail "docker import of $CACHE failed"
docker run --rm --network none "$IMAGE" python3 -c "print('image ok')" >/dev/null \
  || fail "the new image $IMAGE does not run python3"
say "image $IMAGE built"
