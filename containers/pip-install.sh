#!/bin/sh
# pip install inside an image build, offline or online (used by the Dockerfiles through a bind mount).
#
#   pip-install.sh [pip install arguments...]
#
# - A wheelhouse mounted at /wheels (from the `wheelhouse` build stage, see infra/wheelhouse.sh) makes
#   the install offline: --no-index --find-links /wheels. Nothing is downloaded.
# - Otherwise pip uses its index, plus $TORCH_INDEX_URL as an extra index when that is set.
# - A CA bundle passed as the BuildKit secret `ca` (docker build --secret id=ca,src=$SSL_CERT_FILE)
#   is used for TLS, for sites whose proxy intercepts TLS. It never lands in a layer.
set -eu
python=${PYTHON:-python3}

if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca
fi
if ls /wheels/*.whl >/dev/null 2>&1; then
    echo "pip-install: offline, from the wheelhouse ($(ls /wheels/*.whl | wc -l) wheels)"
    set -- --no-index --find-links /wheels "$@"
else
    echo "pip-install: online (no wheelhouse)${TORCH_INDEX_URL:+, extra index $TORCH_INDEX_URL}"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        set -- --extra-index-url "$TORCH_INDEX_URL" "$@"
    fi
fi
exec "$python" -m pip install --no-cache-dir --disable-pip-version-check --no-input "$@"
