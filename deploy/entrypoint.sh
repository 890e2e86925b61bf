#!/bin/sh
# The image's entry point: `entrypoint.sh coordinator`, `entrypoint.sh site` or
# `entrypoint.sh healthcheck coordinator|site`. Settings are environment variables (see
# docs/deployment.md); the script checks the mounted files, then becomes the Flower process.
set -eu
exec python -m fedcare_ops.deploy.entrypoint "$@"
