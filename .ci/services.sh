# Starts the servers some tests need, on loopback, and exports where they are:
#   QUORUM_TEST_POSTGRES_URL  a PostgreSQL server (superuser "quorum", trust auth on 127.0.0.1);
#                             tests create a database of their own on it
#   QUORUM_TEST_S3_ENDPOINT   an S3-compatible server (moto), any access key accepted
# Source it from bash: `source .ci/services.sh`. It installs what is missing (Debian packages
# postgresql, rsync and diffoscope-minimal, PyPI moto[server]) and stops the servers when the
# sourcing shell exits.
# Everything lives in one temporary directory, removed at exit.

quorum_services_dir=$(mktemp -d -t quorum-services.XXXXXX)
chmod 755 "$quorum_services_dir"

quorum_as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

quorum_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

quorum_services_install() {
    local need=()
    [ -n "$(quorum_pg_bin)" ] || need+=(postgresql)
    command -v rsync >/dev/null || need+=(rsync)
    if ((${#need[@]})); then
        echo "installing: ${need[*]}"
        quorum_as_root apt-get update -qq
        quorum_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    # diffoscope explains disputes in the controller's tests; its recommends (hundreds of
    # format tools) would take minutes to install, and the tests compare plain files.
    if ! command -v diffoscope >/dev/null; then
        echo "installing: diffoscope-minimal (without recommends)"
        quorum_as_root apt-get update -qq
        quorum_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends diffoscope-minimal
    fi
    if ! command -v moto_server >/dev/null; then
        echo "installing: moto[server] (PyPI)"
        python3 -m pip install --quiet 'moto[server]'
        hash -r
    fi
}

# A free TCP port on 127.0.0.1 (the kernel picks it; there is a small window before it is used).
quorum_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

quorum_services_start() {
    local pg_bin pg_port s3_port run_as=()
    pg_bin=$(quorum_pg_bin)
    pg_port=$(quorum_free_port)
    # PostgreSQL refuses to run as root: as root, run it as the postgres system user.
    if [ "$(id -u)" = 0 ]; then run_as=(runuser -u postgres --); fi
    mkdir -p "$quorum_services_dir/pg" "$quorum_services_dir/pgsock"
    [ "$(id -u)" = 0 ] && chown postgres "$quorum_services_dir/pg" "$quorum_services_dir/pgsock"
    "${run_as[@]}" "$pg_bin/initdb" -D "$quorum_services_dir/pg/data" -U quorum --auth=trust \
        --no-sync -E UTF8 >"$quorum_services_dir/initdb.log" 2>&1 \
        || { cat "$quorum_services_dir/initdb.log"; return 1; }
    "${run_as[@]}" "$pg_bin/pg_ctl" -D "$quorum_services_dir/pg/data" -w -t 60 \
        -l "$quorum_services_dir/pg/server.log" \
        -o "-h 127.0.0.1 -p $pg_port -k $quorum_services_dir/pgsock -c fsync=off -c max_connections=400" \
        start >/dev/null || { cat "$quorum_services_dir/pg/server.log"; return 1; }
    export QUORUM_TEST_POSTGRES_URL="postgres://quorum@127.0.0.1:$pg_port/postgres"

    s3_port=$(quorum_free_port)
    moto_server -H 127.0.0.1 -p "$s3_port" >"$quorum_services_dir/moto.log" 2>&1 &
    quorum_moto_pid=$!
    local i
    for i in $(seq 1 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1',$s3_port),1)" 2>/dev/null; then break; fi
        sleep 0.1
    done
    export QUORUM_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
    echo "services: PostgreSQL at 127.0.0.1:$pg_port, S3 (moto) at $QUORUM_TEST_S3_ENDPOINT"
}

quorum_services_stop() {
    local run_as=()
    if [ "$(id -u)" = 0 ]; then run_as=(runuser -u postgres --); fi
    [ -n "${quorum_moto_pid:-}" ] && kill "$quorum_moto_pid" 2>/dev/null
    [ -d "$quorum_services_dir/pg/data" ] && "${run_as[@]}" "$(quorum_pg_bin)/pg_ctl" \
        -D "$quorum_services_dir/pg/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$quorum_services_dir"
}

quorum_services_install
trap quorum_services_stop EXIT
quorum_services_start
