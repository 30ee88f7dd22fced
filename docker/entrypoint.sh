#!/bin/sh
# One entrypoint for both images. `exec` makes Python PID 1, so SIGTERM reaches it directly and
# the API drains requests / the worker finishes its batch before the grace period ends.
set -eu

case "${1:-}" in
  api)
    shift
    exec python -m service.api "$@"
    ;;
  worker)
    shift
    exec python -m service.worker "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
