# Sourced by deploy/Dockerfile before each uv install: when the host-made wheelhouse holds
# wheels (`make images`), install from it alone, with no index and no network.
if ls /wheels/*.whl >/dev/null 2>&1; then
    export UV_OFFLINE=1 UV_NO_INDEX=1 UV_FIND_LINKS=/wheels
fi
