#!/usr/bin/env bash
# `make images`: every image the compose stack needs, built on this machine with no registry.
#
#   1. a Debian 12 base: a debootstrap rootfs, `docker import`ed (ordermesh/debian:bookworm);
#   2. uv as an image of its own, from uv's PyPI wheel (ordermesh/uv:<version>);
#   3. a wheelhouse of every locked dependency, downloaded here on the host (build
#      containers need no network, and PyPI's TLS may not be trusted inside them);
#   4. PostgreSQL 15, RabbitMQ 3.10, etcd 3.4 and Prometheus 2.42 from Debian's packages, and
#      the Consul API double (there is no Consul binary to be had);
#   5. the four services with the project's own deploy/Dockerfile.
# Every step is skipped or cached when its inputs have not changed: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${ORDERMESH_TAG:-local}
UV_VERSION=0.13.9            # the same pin as .ci/run and deploy/Dockerfile's default
HATCHLING_VERSION=1.27.0     # the workspace members' build backend, for the offline installs
EDITABLES_VERSION=0.5        # hatchling's dependency for editable installs
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=ordermesh/debian:bookworm
UV_IMAGE=ordermesh/uv:${UV_VERSION}
WHEELS=deploy/images/wheels
SERVICES=(order inventory payment shipping)

PIP_VERSION=25.1.1           # pip runs through uvx: whichever python3 is first on PATH may lack it

started=$(date +%s)
step() { printf '==> [%3ss] %s\n' "$(($(date +%s) - started))" "$*"; }
die() { printf 'make images: %s\n' "$*" >&2; exit 1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
pip_download() { uvx --quiet --from "pip==${PIP_VERSION}" pip download --quiet --disable-pip-version-check "$@"; }
build() {  # build TAG DOCKERFILE CONTEXT [ARGS...]: quiet unless it fails
    local tag=$1 file=$2 context=$3 log
    shift 3
    log=$(mktemp)
    if ! docker build --quiet -t "$tag" -f "$file" "$@" "$context" >"$log" 2>&1; then
        tail -40 "$log" >&2
        rm -f "$log"
        die "building $tag failed (output above)"
    fi
    rm -f "$log"
}

check_tools() {
    docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info fails): start it (e.g. service docker start)"
    command -v uv >/dev/null 2>&1 || die "uv not found: make deps (deploy/local/prereqs.sh uv) installs it"
}

base_image() {
    if have_image "$BASE"; then
        step "base $BASE: present"
        return
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "debootstrap not found: apt-get install debootstrap (as root)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run make images as root"
    step "base $BASE: debootstrap bookworm from $MIRROR (~1 min)"
    local rootfs
    rootfs=$(mktemp -d /var/tmp/ordermesh-rootfs.XXXXXX)
    # minbase plus the interpreter every Python image shares, and CA roots for apt over TLS.
    debootstrap --variant=minbase --include=python3,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    # apt's lists and caches are not wanted in an image layer.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

uv_image() {
    if have_image "$UV_IMAGE"; then
        step "uv $UV_IMAGE: present"
        return
    fi
    step "uv $UV_IMAGE: from the PyPI wheel"
    local dir
    dir=$(mktemp -d)
    pip_download --no-deps --only-binary=:all: "uv==${UV_VERSION}" -d "$dir"
    python3 -m zipfile -e "$dir"/uv-*.whl "$dir/unpacked"
    cp "$dir"/unpacked/uv-*.data/scripts/uv "$dir"/unpacked/uv-*.data/scripts/uvx "$dir/"
    chmod 0755 "$dir/uv" "$dir/uvx"
    printf 'FROM scratch\nCOPY uv uvx /\n' >"$dir/Dockerfile"
    build "$UV_IMAGE" "$dir/Dockerfile" "$dir"
    rm -rf "$dir"
}

wheelhouse() {
    local stamp want
    stamp="$WHEELS/.complete"
    want="$(sha256sum uv.lock | cut -d' ' -f1) hatchling==${HATCHLING_VERSION} editables==${EDITABLES_VERSION}"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        step "wheelhouse $WHEELS: up to date with uv.lock"
        return
    fi
    step "wheelhouse $WHEELS: downloading the locked wheels on the host"
    local requirements
    requirements=$(mktemp)
    uv export --quiet --frozen --no-dev --no-emit-workspace --all-packages --no-header \
        -o "$requirements"
    find "$WHEELS" -name '*.whl' -delete
    # Hashes from the lock: pip refuses any file that is not the locked one.
    pip_download --no-deps --only-binary=:all: -r "$requirements" -d "$WHEELS"
    pip_download --only-binary=:all: -d "$WHEELS" \
        "hatchling==${HATCHLING_VERSION}" "editables==${EDITABLES_VERSION}"
    rm -f "$requirements"
    printf '%s\n' "$want" >"$stamp"
}

infra_images() {
    step "postgres, rabbitmq, etcd, prometheus from Debian's packages"
    build ordermesh/postgres:15 deploy/images/postgres/Dockerfile deploy/images/postgres \
        --build-arg "BASE=$BASE"
    build ordermesh/rabbitmq:3.10 deploy/images/rabbitmq/Dockerfile deploy/images/rabbitmq \
        --build-arg "BASE=$BASE"
    build ordermesh/etcd:3.4 deploy/images/etcd/Dockerfile deploy/images/etcd \
        --build-arg "BASE=$BASE"
    # The one part of the compose profile `observability` Debian packages (no Jaeger, no Grafana).
    build ordermesh/prometheus:2.42 deploy/images/prometheus/Dockerfile deploy/images/prometheus \
        --build-arg "BASE=$BASE"
}

service_images() {
    local service
    for service in "${SERVICES[@]}"; do
        step "service ordermesh/$service:$TAG (deploy/Dockerfile)"
        build "ordermesh/$service:$TAG" deploy/Dockerfile . \
            --build-arg "SERVICE=$service" \
            --build-arg "PYTHON_IMAGE=$BASE" \
            --build-arg "UV_IMAGE=$UV_IMAGE"
    done
}

consul_double_image() {
    # The double's source lives with the tests; the image is the order service's (it has
    # the double's few dependencies) plus that one file.
    step "consul API double ordermesh/consul-double:$TAG"
    local dir
    dir=$(mktemp -d)
    cp deploy/images/consul/Dockerfile tests/support/consul_double.py "$dir/"
    build "ordermesh/consul-double:$TAG" "$dir/Dockerfile" "$dir" \
        --build-arg "FROM_IMAGE=ordermesh/order:$TAG"
    rm -rf "$dir"
}

check_tools
base_image
uv_image
wheelhouse
infra_images
service_images
consul_double_image
step "done: every image of the offline compose stack is built"
