#!/bin/sh
# Entrypoint of the qaq images. For `qaq-worker serve`, makes sure the model is there:
# mounted at $QAQ_MODEL, or (QAQ_FETCH_MODEL=1) fetched by scripts/fetch-model.sh,
# which downloads the default model into /opt/qaq/models and checks its sha256.
set -eu
if [ "${1:-}" = "qaq-worker" ] || [ "${QAQ_FETCH_MODEL:-0}" = "1" ]; then
  if [ ! -e "${QAQ_MODEL:-}" ]; then
    if [ "${QAQ_FETCH_MODEL:-0}" = "1" ]; then
      /opt/qaq/scripts/fetch-model.sh
    fi
    if [ ! -e "${QAQ_MODEL:-}" ] && [ "${1:-}" = "qaq-worker" ]; then
      echo "qaq-entrypoint: model not found at QAQ_MODEL=${QAQ_MODEL:-} (mount it under /opt/qaq/models, or set QAQ_FETCH_MODEL=1)" >&2
      exit 1
    fi
  fi
fi
[ "$#" -gt 0 ] || exit 0
exec "$@"
