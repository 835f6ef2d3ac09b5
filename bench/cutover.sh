#!/usr/bin/env bash
# bench/cutover.sh — the write-unavailability window of `kuaka cutover` (and of
# `kuaka fallback`) for a PostgreSQL -> PostgreSQL job while the source works.
#
# Each of $RUNS runs: a fresh `src` (pgbench -i -s $SCALE, copied from a
# template) and an empty `dst`; `kuaka run` snapshots and streams; once it
# streams, `pgbench -c $CLIENTS -j 2` writes flat out to the source and a probe
# writes one row at a time to whichever database accepts it (source first,
# moving to the target when the source refuses). After $LOAD_SECONDS s,
# `kuaka cutover` runs; a few seconds later `kuaka fallback`. Printed per run
# and as medians:
#   window (kuaka)   what kuaka reports: fence of the database the application
#                    writes to -> the other one writable
#   gap (probe)      what the probe saw: its last acknowledged write on the old
#                    database -> its first on the new one (a psql per write, so
#                    a few ms of resolution are lost to process start-up)
#   steps            the time of each cutover step, from kuaka's report
# Target of the issue: window under 2 s, aiming under 1 s.
#
# ENGINE=mariadb: the source is a private MariaDB 10.11 (binlog ROW/FULL) and the
# target a PostgreSQL database; the load is `sysbench oltp_write_only --threads
# $CLIENTS` as an application user (not root: read_only does not hold off
# admins), on $SB_TABLES tables of $SB_SIZE rows prepared per run; the probe
# writes as that user too. `kuaka cutover` starts reverse replication
# (PostgreSQL -> MariaDB); `kuaka fallback` follows as for PostgreSQL, with the
# probe's writes on the target as the only load then.
#
# No peer: none of pgcopydb, pgloader, Debezium or DM automates a cutover (see
# ../shared/research/anchors-cdc.md), so there is nothing to run side by side;
# the script prints kuaka's numbers against the issue's target instead.
#
# Server: a private PostgreSQL 15 cluster in a temp dir on a free port (never
# the machine's own server), wal_level=logical, trust auth; stopped and removed
# on exit. Source and target are databases of this one cluster on this 2-core
# machine, which also runs pgbench, the probe and kuaka.
#
# Usage: bench/cutover.sh [-h]
# Environment:
#   RUNS=5  SCALE=10  CLIENTS=4  LOAD_SECONDS=5  ENGINE=postgres|mariadb
#   SB_TABLES=4  SB_SIZE=100000   (ENGINE=mariadb)
#   KUAKA_BIN=path   (default target/release/kuaka; cargo build --release first)
#   PGBIN=dir        (default /usr/lib/postgresql/15/bin)   PORT=n (default 55632)
# Needs: PostgreSQL 15 server binaries and pgbench, psql, jq; for ENGINE=mariadb
#   also mariadbd, mariadb-install-db, mariadb and sysbench.

set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
RUNS=${RUNS:-5}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
LOAD_SECONDS=${LOAD_SECONDS:-5}
KUAKA_BIN=${KUAKA_BIN:-$repo_dir/target/release/kuaka}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-55632}
ENGINE=${ENGINE:-postgres}
SB_TABLES=${SB_TABLES:-4}
SB_SIZE=${SB_SIZE:-100000}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
[[ -x $KUAKA_BIN ]] || die "no kuaka binary at $KUAKA_BIN (cargo build --release)"
[[ -x $PGBIN/initdb && -x $PGBIN/pgbench ]] || die "no PostgreSQL 15 binaries in $PGBIN"
command -v jq >/dev/null || die "jq missing (apt-get install -y jq)"
export PATH=$PGBIN:$PATH
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE
export PGOPTIONS="-c client_min_messages=warning"

as_owner() {
    if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}

DIR=$(mktemp -d /tmp/kuaka-bench-cutover.XXXXXX)
DATA=$DIR/data
SOCK=$DIR/sock
mkdir -p "$SOCK" "$DIR/work"
((EUID == 0)) && chown postgres: "$DIR" "$SOCK"
server_started=0
KUAKA_PID=""
PGBENCH_PID=""
PROBE_PID=""
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for p in $PROBE_PID $PGBENCH_PID; do kill "$p" 2>/dev/null; done
    if [[ -n $KUAKA_PID ]]; then
        kill -TERM "$KUAKA_PID" 2>/dev/null
        wait "$KUAKA_PID" 2>/dev/null
    fi
    ((server_started)) && as_owner "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1
    [[ -f $DIR/my/pid ]] && kill "$(cat "$DIR/my/pid")" 2>/dev/null && sleep 2
    [[ -n ${KEEP_DIR:-} ]] || rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
while port_in_use "$PORT"; do PORT=$((PORT + 1)); done
as_owner "$PGBIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C --auth=trust >"$DIR/initdb.log" 2>&1 ||
    die "initdb failed: $(cat "$DIR/initdb.log")"
as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_connections = 100
shared_buffers = 512MB
max_wal_size = 8GB
EOF
as_owner "$PGBIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w start >/dev/null
server_started=1
url() { echo "postgresql://postgres@127.0.0.1:$PORT/$1"; }
q() { psql -X -q -At -d "$(url "$1")" -c "$2"; }

# gap <old> <new> <file>: seconds from the last write on old to the first on new after it
gap() {
    awk -v old="$1" -v new="$2" '
        $2 == old { last = $1 }
        $2 == new && last != "" && !seen { printf "%.3f", $1 - last; seen = 1 }
    ' "$3"
}

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

if [[ $ENGINE == mariadb ]]; then
    for tool in mariadbd mariadb-install-db mariadb sysbench; do
        command -v "$tool" >/dev/null || die "$tool missing (apt-get install -y mariadb-server sysbench)"
    done
    MY_PORT=$((PORT + 1))
    while port_in_use "$MY_PORT"; do MY_PORT=$((MY_PORT + 1)); done
    mkdir -p "$DIR/my"
    mariadb-install-db --no-defaults --datadir="$DIR/my/data" --user=root \
        --auth-root-authentication-method=normal --skip-test-db >"$DIR/my/install.log" 2>&1 ||
        die "mariadb-install-db failed"
    mariadbd --no-defaults --datadir="$DIR/my/data" --user=root --socket="$DIR/my/sock" \
        --port="$MY_PORT" --bind-address=127.0.0.1 --log-bin="$DIR/my/binlog" \
        --log-error="$DIR/my/error.log" --pid-file="$DIR/my/pid" --server-id=1 \
        --binlog-format=ROW --binlog-row-image=FULL --binlog-row-metadata=FULL --skip-name-resolve \
        --innodb-buffer-pool-size=1G --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 \
        --tmpdir="$DIR/my" --max-connections=200 >/dev/null 2>&1 &
    my() { mariadb --no-defaults --socket="$DIR/my/sock" -uroot -N -B "$@"; }
    for _ in $(seq 60); do my -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
    my -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
           CREATE USER app@'%' IDENTIFIED BY 'app';" || die "MariaDB did not start (see $DIR/my/error.log)"
    probe_my() {
        local current=src want out
        while :; do
            want=$(cat "$DIR/work/prefer")
            if [[ $current == src ]]; then
                out=$(mariadb --no-defaults -h127.0.0.1 -P"$MY_PORT" -uapp -papp -N -B "$1" \
                    -e "INSERT INTO probe () VALUES (); SELECT UNIX_TIMESTAMP(NOW(6))" 2>&1) &&
                    { echo "$out src"; continue; }
            else
                out=$(psql -X -q -At -d "$(url dst)" -c "INSERT INTO probe (at) VALUES (clock_timestamp()) RETURNING extract(epoch FROM clock_timestamp())" 2>&1) &&
                    { echo "$out dst"; continue; }
            fi
            [[ $out == *read-only* || $out == *read_only* ]] && [[ $current != "$want" ]] && current=$want
        done
    }
    : >"$DIR/cut_windows"
    : >"$DIR/cut_gaps"
    : >"$DIR/fall_windows"
    : >"$DIR/fall_gaps"
    printf '%-4s %12s %12s %12s %12s  %s\n' run "cutover" "probe gap" "fallback" "probe gap" "cutover steps (s)"
    for run in $(seq 1 "$RUNS"); do
        db=src$run
        my -e "SET GLOBAL read_only = OFF; CREATE DATABASE $db; GRANT ALL ON $db.* TO app@'%';
               CREATE TABLE $db.probe (id bigint AUTO_INCREMENT PRIMARY KEY, at datetime(6) NOT NULL DEFAULT NOW(6));"
        sysbench oltp_write_only --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$MY_PORT" \
            --mysql-user=root --mysql-db="$db" --tables="$SB_TABLES" --table-size="$SB_SIZE" \
            prepare >"$DIR/work/prepare$run.log" 2>&1 || die "sysbench prepare failed"
        q postgres "DROP DATABASE IF EXISTS dst" >/dev/null
        q postgres "CREATE DATABASE dst"
        state=$DIR/work/state$run
        "$KUAKA_BIN" --no-progress run --source "mysql://root@127.0.0.1:$MY_PORT/$db" --target "$(url dst)" \
            --state "$state" >"$DIR/work/run$run.log" 2>&1 &
        KUAKA_PID=$!
        for _ in $(seq 1 900); do
            [[ $("$KUAKA_BIN" status --state "$state" --json 2>/dev/null | jq -r .phase) == streaming ]] && break
            kill -0 "$KUAKA_PID" 2>/dev/null || die "kuaka run stopped: $(tail -5 "$DIR/work/run$run.log")"
            sleep 0.2
        done
        echo src >"$DIR/work/prefer"
        sysbench oltp_write_only --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$MY_PORT" \
            --mysql-user=app --mysql-password=app --mysql-db="$db" --tables="$SB_TABLES" \
            --table-size="$SB_SIZE" --threads="$CLIENTS" --time=600 run >"$DIR/work/sysbench$run.log" 2>&1 &
        PGBENCH_PID=$!
        probe_my "$db" >"$DIR/work/probe$run" &
        PROBE_PID=$!
        sleep "$LOAD_SECONDS"
        echo dst >"$DIR/work/prefer"
        "$KUAKA_BIN" cutover --state "$state" --max-lag 10 >"$DIR/work/cutover$run.log" 2>&1 ||
            die "cutover failed: $(tail -5 "$DIR/work/cutover$run.log")"
        kill "$PGBENCH_PID" 2>/dev/null || true
        wait "$PGBENCH_PID" 2>/dev/null || true
        PGBENCH_PID=""
        sleep 2
        cut=$(jq -r .window_seconds "$state/cutover.json")
        steps=$(jq -r '[.steps[] | "\(.name)=\(.seconds * 1000 | floor / 1000)"] | join(" ")' "$state/cutover.json")
        echo src >"$DIR/work/prefer"
        "$KUAKA_BIN" fallback --state "$state" --max-lag 10 >"$DIR/work/fallback$run.log" 2>&1 ||
            die "fallback failed: $(tail -5 "$DIR/work/fallback$run.log")"
        sleep 2
        kill "$PROBE_PID" 2>/dev/null || true
        wait "$PROBE_PID" 2>/dev/null || true
        PROBE_PID=""
        fall=$(jq -r .window_seconds "$state/cutover.json")
        kill -TERM "$KUAKA_PID" 2>/dev/null || true
        wait "$KUAKA_PID" 2>/dev/null || true
        KUAKA_PID=""
        cut_gap=$(gap src dst "$DIR/work/probe$run")
        fall_gap=$(awk '$2 == "dst" { d = 1 } d' "$DIR/work/probe$run" | gap dst src /dev/stdin)
        echo "$cut" >>"$DIR/cut_windows"
        echo "${cut_gap:-nan}" >>"$DIR/cut_gaps"
        echo "$fall" >>"$DIR/fall_windows"
        echo "${fall_gap:-nan}" >>"$DIR/fall_gaps"
        printf '%-4s %11ss %11ss %11ss %11ss  %s\n' "$run" "$cut" "${cut_gap:-?}" "$fall" "${fall_gap:-?}" "$steps"
    done
    mc=$(median <"$DIR/cut_windows")
    mg=$(median <"$DIR/cut_gaps")
    mf=$(median <"$DIR/fall_windows")
    mfg=$(median <"$DIR/fall_gaps")
    printf '%-4s %11ss %11ss %11ss %11ss\n' median "$mc" "$mg" "$mf" "$mfg"
    verdict=$(awk -v w="$mc" 'BEGIN { print (w < 1 ? "met (under 1 s)" : (w < 2 ? "met (under 2 s, not under 1 s)" : "NOT met")) }')
    echo "target: MariaDB -> PostgreSQL cutover window under 2 s (aim 1 s) with sysbench oltp_write_only --threads $CLIENTS: $verdict"
    exit 0
fi

log "building the source template (pgbench -i -s $SCALE)"
q postgres "CREATE DATABASE tmpl"
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$PORT" -U postgres tmpl >/dev/null 2>&1
# Change capture needs a key on every table (pgbench_history has none).
q tmpl "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"
q tmpl "CREATE TABLE probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"

# The probe: one INSERT per psql, to the database that takes it; prints
# "<epoch seconds> <db>" per acknowledged write.
probe() {
    local current=src want
    while :; do
        want=$(cat "$DIR/work/prefer")
        if out=$(psql -X -q -At -d "$(url "$current")" -c "INSERT INTO probe DEFAULT VALUES RETURNING extract(epoch FROM clock_timestamp())" 2>&1); then
            echo "$out $current"
        elif [[ $out == *read-only* && $current != "$want" ]]; then
            current=$want
        fi
    done
}


: >"$DIR/cut_windows"
: >"$DIR/cut_gaps"
: >"$DIR/fall_windows"
: >"$DIR/fall_gaps"
printf '%-4s %12s %12s %12s %12s  %s\n' run "cutover" "probe gap" "fallback" "probe gap" "cutover steps (s)"
for run in $(seq 1 "$RUNS"); do
    q postgres "DROP DATABASE IF EXISTS src" >/dev/null
    q postgres "DROP DATABASE IF EXISTS dst" >/dev/null
    q postgres "CREATE DATABASE src TEMPLATE tmpl"
    q postgres "CREATE DATABASE dst"
    state=$DIR/work/state$run
    "$KUAKA_BIN" --no-progress run --source "$(url src)" --target "$(url dst)" --state "$state" \
        >"$DIR/work/run$run.log" 2>&1 &
    KUAKA_PID=$!
    for _ in $(seq 1 600); do
        [[ $("$KUAKA_BIN" status --state "$state" --json 2>/dev/null | jq -r .phase) == streaming ]] && break
        kill -0 "$KUAKA_PID" 2>/dev/null || die "kuaka run stopped: $(tail -5 "$DIR/work/run$run.log")"
        sleep 0.2
    done
    echo src >"$DIR/work/prefer"
    pgbench -n -c "$CLIENTS" -j 2 -T 600 -h 127.0.0.1 -p "$PORT" -U postgres src >"$DIR/work/pgbench$run.log" 2>&1 &
    PGBENCH_PID=$!
    probe >"$DIR/work/probe$run" &
    PROBE_PID=$!
    sleep "$LOAD_SECONDS"
    echo dst >"$DIR/work/prefer"
    "$KUAKA_BIN" cutover --state "$state" --max-lag 10 >"$DIR/work/cutover$run.log" 2>&1 ||
        die "cutover failed: $(tail -5 "$DIR/work/cutover$run.log")"
    kill "$PGBENCH_PID" 2>/dev/null || true
    wait "$PGBENCH_PID" 2>/dev/null || true
    PGBENCH_PID=""
    sleep 2
    cut=$(jq -r .window_seconds "$state/cutover.json")
    steps=$(jq -r '[.steps[] | "\(.name)=\(.seconds * 1000 | floor / 1000)"] | join(" ")' "$state/cutover.json")
    echo src >"$DIR/work/prefer"
    "$KUAKA_BIN" fallback --state "$state" --max-lag 10 >"$DIR/work/fallback$run.log" 2>&1 ||
        die "fallback failed: $(tail -5 "$DIR/work/fallback$run.log")"
    sleep 2
    kill "$PROBE_PID" 2>/dev/null || true
    wait "$PROBE_PID" 2>/dev/null || true
    PROBE_PID=""
    fall=$(jq -r .window_seconds "$state/cutover.json")
    cut_gap=$(gap src dst "$DIR/work/probe$run")
    fall_gap=$(awk '$2 == "dst" { d = 1 } d' "$DIR/work/probe$run" | gap dst src /dev/stdin)
    kill -TERM "$KUAKA_PID" 2>/dev/null || true
    wait "$KUAKA_PID" 2>/dev/null || true
    KUAKA_PID=""
    "$KUAKA_BIN" clean --state "$state" --source "$(url src)" --target "$(url dst)" >/dev/null 2>&1 || true
    echo "$cut" >>"$DIR/cut_windows"
    echo "${cut_gap:-nan}" >>"$DIR/cut_gaps"
    echo "$fall" >>"$DIR/fall_windows"
    echo "${fall_gap:-nan}" >>"$DIR/fall_gaps"
    printf '%-4s %11ss %11ss %11ss %11ss  %s\n' "$run" "$cut" "${cut_gap:-?}" "$fall" "${fall_gap:-?}" "$steps"
done
mc=$(median <"$DIR/cut_windows")
mg=$(median <"$DIR/cut_gaps")
mf=$(median <"$DIR/fall_windows")
mfg=$(median <"$DIR/fall_gaps")
printf '%-4s %11ss %11ss %11ss %11ss\n' median "$mc" "$mg" "$mf" "$mfg"
verdict=$(awk -v w="$mc" 'BEGIN { print (w < 1 ? "met (under 1 s)" : (w < 2 ? "met (under 2 s, not under 1 s)" : "NOT met")) }')
echo "target: cutover window under 2 s (aim 1 s) with pgbench -c $CLIENTS: $verdict"
