#!/usr/bin/env bash
# bench/mysql.sh — MariaDB -> PostgreSQL, kuaka against pgloader, on the same data:
#   (1) snapshot: `kuaka run --snapshot-only` vs `pgloader mysql://... postgresql://...`,
#       each into a fresh empty PostgreSQL database; wall time, rows/s, peak RSS, row check;
#       kuaka's speedup = pgloader seconds / kuaka seconds.
#   (2) CDC lag under load: kuaka streams while `sysbench oltp_write_only` writes to the
#       source at RATE transactions/s; a heartbeat row is inserted every 100 ms with its
#       send time, and the target stamps its arrival (a column default added on the
#       target only), so lag = arrival - send per heartbeat; prints p50 / p99 / max.
#
# Data: one MariaDB database `src` holding sysbench tables (TABLES x TABLE_SIZE rows,
# `sysbench oltp_read_write prepare`) plus the employees sample from shared/datasets.
#
# Servers: a private MariaDB 10.11 (binlog ROW/FULL) and a private PostgreSQL 15, each in
# a temp dir on a free port, stopped and removed on exit. Both on this one machine: source
# reads and target writes share its cores (2 here) for every tool alike.
#
#   (3) MariaDB -> MariaDB snapshot on the same data: `kuaka run --snapshot-only` vs
#       `mydumper | myloader` (dump to files, then load; JOBS threads each, myloader with
#       --enable-binlog so it writes the binlog like kuaka does) vs
#       `mariadb-dump --single-transaction | mariadb`; into fresh databases of the same server.
#
# Usage: bench/mysql.sh [-h]
# Environment:
#   TABLES=4 TABLE_SIZE=500000   sysbench data (default 2M rows)
#   JOBS=2                       kuaka --jobs; pgloader gets workers=JOBS*2, concurrency=1
#   TOOLS="kuaka pgloader"       which MariaDB -> PostgreSQL tools to run
#   MY_TOOLS="kuaka mydumper mysqldump"   which MariaDB -> MariaDB tools to run
#   LAG=1 LAG_SECONDS=30 RATE=200   the CDC part (LAG=0 skips it)
#   SKIP_BUILD=1                 use target/release/kuaka as it is
#   KUAKA_BIN=path               another kuaka binary
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

TABLES=${TABLES:-4}
TABLE_SIZE=${TABLE_SIZE:-500000}
JOBS=${JOBS:-2}
TOOLS=${TOOLS:-"kuaka pgloader"}
MY_TOOLS=${MY_TOOLS-"kuaka mydumper mysqldump"}
LAG=${LAG:-1}
LAG_SECONDS=${LAG_SECONDS:-30}
RATE=${RATE:-200}
SKIP_BUILD=${SKIP_BUILD:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
KUAKA_BIN=${KUAKA_BIN:-$repo_dir/target/release/kuaka}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

for tool in mariadbd mariadb-install-db mariadb sysbench; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install -y mariadb-server sysbench)"
done
[[ -x $PGBIN/initdb ]] || die "no PostgreSQL 15 in $PGBIN (apt-get install -y postgresql-15)"
[[ -x /usr/bin/time ]] || die "GNU time missing (apt-get install -y time)"
if [[ " $TOOLS " == *" pgloader "* ]]; then
    command -v pgloader >/dev/null || die "pgloader missing (apt-get install -y pgloader)"
fi
employees_dir=""
for d in "${KUAKA_SHARED_DIR:-/nonexistent}" "$repo_dir/../shared" /work/shared; do
    [[ -f $d/datasets/employees/employee.sql ]] && employees_dir=$d/datasets/employees && break
done
[[ -n $employees_dir ]] || die "employees dataset not found (set KUAKA_SHARED_DIR to the shared/ folder)"

as_postgres() { if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() {
    local p=$1
    while (: <"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}

BENCH_DIR=$(mktemp -d /tmp/kuaka-bench-mysql.XXXXXX)
chmod 755 "$BENCH_DIR"
MY_PORT=$(free_port 23306)
PG_PORT=$(free_port 25432)
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n ${bg_pids:-} ]] && kill $bg_pids 2>/dev/null
    [[ -f $BENCH_DIR/my/pid ]] && kill "$(cat "$BENCH_DIR/my/pid")" 2>/dev/null
    [[ -d $BENCH_DIR/pg ]] && as_postgres "$PGBIN/pg_ctl" -D "$BENCH_DIR/pg" -m fast -w stop >/dev/null 2>&1
    sleep 2
    rm -rf "$BENCH_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ((!SKIP_BUILD)) && [[ " $TOOLS " == *" kuaka "* || $LAG == 1 ]]; then
    log "cargo build --release"
    (cd "$repo_dir" && cargo build --release -q) || die "build failed"
fi

# ------------------------------------------------------------------ servers --
log "MariaDB on 127.0.0.1:$MY_PORT, PostgreSQL on 127.0.0.1:$PG_PORT (in $BENCH_DIR)"
mkdir -p "$BENCH_DIR/my"
mariadb-install-db --no-defaults --datadir="$BENCH_DIR/my/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >"$BENCH_DIR/my/install.log" 2>&1 ||
    die "mariadb-install-db failed"
mariadbd --no-defaults --datadir="$BENCH_DIR/my/data" --user=root --socket="$BENCH_DIR/my/sock" \
    --port="$MY_PORT" --bind-address=127.0.0.1 --log-bin="$BENCH_DIR/my/binlog" \
    --log-error="$BENCH_DIR/my/error.log" --pid-file="$BENCH_DIR/my/pid" --server-id=1 \
    --binlog-format=ROW --binlog-row-image=FULL --binlog-row-metadata=FULL --skip-name-resolve \
    --innodb-buffer-pool-size=2G --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 \
    --max-connections=200 >/dev/null 2>&1 &
my() { mariadb --no-defaults --socket="$BENCH_DIR/my/sock" -uroot -N -B "$@"; }
for _ in $(seq 60); do my -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
my -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; CREATE DATABASE src;" ||
    die "MariaDB did not start (see $BENCH_DIR/my/error.log)"

chown postgres: "$BENCH_DIR" 2>/dev/null || true
as_postgres "$PGBIN/initdb" -D "$BENCH_DIR/pg" -U postgres -E UTF8 --locale=C --auth=trust >/dev/null ||
    die "initdb failed"
as_postgres "$PGBIN/pg_ctl" -D "$BENCH_DIR/pg" -l "$BENCH_DIR/pg.log" -w \
    -o "-p $PG_PORT -k $BENCH_DIR -c listen_addresses=127.0.0.1 -c shared_buffers=1GB -c max_wal_size=8GB -c checkpoint_timeout=30min -c fsync=on" \
    start >/dev/null || die "PostgreSQL did not start"
pg() { "$PGBIN/psql" -X -q -tA -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -c "$2"; }
SOURCE=mysql://root@127.0.0.1:$MY_PORT/src
target_url() { echo "postgres://postgres@127.0.0.1:$PG_PORT/$1"; }

# --------------------------------------------------------------------- data --
log "sysbench prepare: $TABLES tables x $TABLE_SIZE rows"
sysbench oltp_read_write --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$MY_PORT" \
    --mysql-user=root --mysql-db=src --tables="$TABLES" --table-size="$TABLE_SIZE" \
    --threads="$JOBS" prepare >"$BENCH_DIR/prepare.log" 2>&1 || die "sysbench prepare failed"
log "loading employees"
sed -n '/^CREATE TABLE/,/^flush/p' "$employees_dir/employee.sql" | sed '/^flush/d' | my src
for f in department employee dept_emp dept_manager title salary1; do
    if [[ -f $employees_dir/load_$f.sql ]]; then my src <"$employees_dir/load_$f.sql"; else gzip -dc "$employees_dir/load_$f.sql.gz" | my src; fi
done
my src -e "ANALYZE TABLE $(my -e "SELECT GROUP_CONCAT(table_name) FROM information_schema.tables WHERE table_schema = 'src' AND table_type = 'BASE TABLE'")" >/dev/null
source_rows=0
for t in $(my -e "SELECT table_name FROM information_schema.tables WHERE table_schema = 'src' AND table_type = 'BASE TABLE'"); do
    source_rows=$((source_rows + $(my src -e "SELECT count(*) FROM \`$t\`")))
done
source_mb=$(my -e "SELECT ROUND(SUM(data_length + index_length) / 1048576) FROM information_schema.tables WHERE table_schema = 'src'")
log "source: $source_rows rows, $source_mb MB"

# ----------------------------------------------------------------- snapshot --
declare -A seconds status rss
target_rows() { # database, schema
    local total=0 n
    for t in $(pg "$1" "SELECT tablename FROM pg_tables WHERE schemaname = '$2'"); do
        n=$(pg "$1" "SELECT count(*) FROM \"$2\".\"$t\"")
        total=$((total + n))
    done
    echo "$total"
}
for tool in $TOOLS; do
    db=dst_$tool
    pg postgres "DROP DATABASE IF EXISTS $db" && pg postgres "CREATE DATABASE $db"
    pg postgres "CHECKPOINT"
    sync
    log "$tool: copying"
    start=$(date +%s.%N)
    rc=0
    case $tool in
    kuaka)
        /usr/bin/time -v -o "$BENCH_DIR/time.$tool" "$KUAKA_BIN" run --no-progress --snapshot-only \
            --jobs "$JOBS" --source "$SOURCE" --target "$(target_url "$db")" \
            --state "$BENCH_DIR/state.$tool" >"$BENCH_DIR/$tool.log" 2>&1 || rc=$?
        schema=public
        ;;
    pgloader)
        /usr/bin/time -v -o "$BENCH_DIR/time.$tool" pgloader --dynamic-space-size 8192 --no-ssl-cert-verification \
            --with "workers = $((JOBS * 2))" --with "concurrency = 1" \
            "$SOURCE" "postgresql://postgres@127.0.0.1:$PG_PORT/$db" >"$BENCH_DIR/$tool.log" 2>&1 || rc=$?
        schema=src
        ;;
    esac
    end=$(date +%s.%N)
    seconds[$tool]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
    rss[$tool]=$(awk -F': *' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$BENCH_DIR/time.$tool")
    rows=$(target_rows "$db" "$schema")
    if ((rc == 0 && rows == source_rows)); then status[$tool]=ok; else
        status[$tool]="FAILED (exit $rc, $rows rows)"
        tail -n 5 "$BENCH_DIR/$tool.log" >&2
    fi
    log "$tool: ${seconds[$tool]} s, ${status[$tool]}"
    if [[ $tool == kuaka ]]; then
        # Where kuaka's time went: the copy itself, then keys, indexes and foreign keys.
        tail -n 4 "$BENCH_DIR/$tool.log" >&2
    fi
done

echo
echo "MariaDB -> PostgreSQL snapshot: $source_rows rows, $source_mb MB (sysbench $TABLES x $TABLE_SIZE + employees), JOBS=$JOBS"
printf '%-10s %10s %12s %10s %12s  %s\n' tool seconds rows/s MB/s "peak RSS MB" status
for tool in $TOOLS; do
    printf '%-10s %10s %12.0f %10.1f %12s  %s\n' "$tool" "${seconds[$tool]}" \
        "$(awk -v r="$source_rows" -v s="${seconds[$tool]}" 'BEGIN { print r / s }')" \
        "$(awk -v m="$source_mb" -v s="${seconds[$tool]}" 'BEGIN { print m / s }')" \
        "${rss[$tool]}" "${status[$tool]}"
done
if [[ ${status[kuaka]:-} == ok && ${status[pgloader]:-} == ok ]]; then
    awk -v k="${seconds[kuaka]}" -v p="${seconds[pgloader]}" \
        'BEGIN { printf "kuaka speedup over pgloader: %.2fx (pgloader seconds / kuaka seconds)\n", p / k }'
fi

# --------------------------------------------------------- MariaDB -> MariaDB --
declare -A my_seconds my_status
my_rows() {
    local total=0
    for t in $(my -e "SELECT table_name FROM information_schema.tables WHERE table_schema = '$1' AND table_type = 'BASE TABLE'"); do
        total=$((total + $(my "$1" -e "SELECT count(*) FROM \`$t\`")))
    done
    echo "$total"
}
for tool in $MY_TOOLS; do
    db=my_$tool
    my -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
    sync
    log "$tool (MariaDB -> MariaDB): copying"
    start=$(date +%s.%N)
    rc=0
    case $tool in
    kuaka)
        "$KUAKA_BIN" run --no-progress --snapshot-only --jobs "$JOBS" --source "$SOURCE" \
            --target "mysql://root@127.0.0.1:$MY_PORT/$db" --state "$BENCH_DIR/state.my" \
            >"$BENCH_DIR/my-$tool.log" 2>&1 || rc=$?
        ;;
    mydumper)
        rm -rf "$BENCH_DIR/dump"
        { mydumper -h 127.0.0.1 -P "$MY_PORT" -u root -B src -o "$BENCH_DIR/dump" -t "$JOBS" --rows 250000 &&
            myloader -h 127.0.0.1 -P "$MY_PORT" -u root -B "$db" -d "$BENCH_DIR/dump" -t "$JOBS" --enable-binlog; } \
            >"$BENCH_DIR/my-$tool.log" 2>&1 || rc=$?
        ;;
    mysqldump)
        { mariadb-dump -h 127.0.0.1 -P "$MY_PORT" -u root --single-transaction src |
            mariadb -h 127.0.0.1 -P "$MY_PORT" -u root "$db"; } >"$BENCH_DIR/my-$tool.log" 2>&1 || rc=$?
        ;;
    esac
    end=$(date +%s.%N)
    my_seconds[$tool]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
    rows=$(my_rows "$db")
    if ((rc == 0 && rows >= source_rows)); then my_status[$tool]=ok; else
        my_status[$tool]="FAILED (exit $rc, $rows rows)"
        tail -n 5 "$BENCH_DIR/my-$tool.log" >&2
    fi
    log "$tool: ${my_seconds[$tool]} s, ${my_status[$tool]}"
    my -e "DROP DATABASE IF EXISTS $db"
done
if [[ -n $MY_TOOLS ]]; then
    echo
    echo "MariaDB -> MariaDB snapshot: $source_rows rows, $source_mb MB, JOBS=$JOBS"
    printf '%-10s %10s %12s  %s\n' tool seconds rows/s status
    for tool in $MY_TOOLS; do
        printf '%-10s %10s %12.0f  %s\n' "$tool" "${my_seconds[$tool]}" \
            "$(awk -v r="$source_rows" -v s="${my_seconds[$tool]}" 'BEGIN { print r / s }')" "${my_status[$tool]}"
    done
    for peer in mydumper mysqldump; do
        if [[ ${my_status[kuaka]:-} == ok && ${my_status[$peer]:-} == ok ]]; then
            awk -v k="${my_seconds[kuaka]}" -v p="${my_seconds[$peer]}" -v n="$peer" \
                'BEGIN { printf "kuaka speedup over %s: %.2fx\n", n, p / k }'
        fi
    done
fi

# ---------------------------------------------------------------------- lag --
if ((LAG)); then
    echo
    log "CDC lag: sysbench oltp_write_only at $RATE tx/s for $LAG_SECONDS s"
    my src -e "CREATE TABLE kuaka_heartbeat (id bigint PRIMARY KEY, sent double NOT NULL)"
    pg postgres "DROP DATABASE IF EXISTS dst_cdc" && pg postgres "CREATE DATABASE dst_cdc"
    tables=()
    for i in $(seq "$TABLES"); do tables+=(--tables "sbtest$i"); done
    "$KUAKA_BIN" run --no-progress --source "$SOURCE" --target "$(target_url dst_cdc)" \
        --state "$BENCH_DIR/state.cdc" --jobs "$JOBS" "${tables[@]}" --tables kuaka_heartbeat \
        >"$BENCH_DIR/cdc.log" 2>&1 &
    kuaka_pid=$!
    bg_pids="$kuaka_pid"
    for _ in $(seq 600); do
        phase=$("$KUAKA_BIN" status --json --state "$BENCH_DIR/state.cdc" 2>/dev/null | sed -n 's/.*"phase": *"\([a-z_]*\)".*/\1/p' | head -1 || true)
        [[ $phase == streaming ]] && break
        kill -0 "$kuaka_pid" 2>/dev/null || die "kuaka stopped: $(tail -n 3 "$BENCH_DIR/cdc.log")"
        sleep 1
    done
    [[ $phase == streaming ]] || die "kuaka did not reach streaming"
    pg dst_cdc "ALTER TABLE kuaka_heartbeat ADD COLUMN arrived timestamptz DEFAULT clock_timestamp()"
    sysbench oltp_write_only --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$MY_PORT" \
        --mysql-user=root --mysql-db=src --tables="$TABLES" --table-size="$TABLE_SIZE" \
        --threads=4 --rate="$RATE" --time="$LAG_SECONDS" --report-interval=0 run >"$BENCH_DIR/sysbench.log" 2>&1 &
    bg_pids="$kuaka_pid $!"
    end=$(($(date +%s) + LAG_SECONDS))
    i=0
    while (($(date +%s) < end)); do
        i=$((i + 1))
        my src -e "INSERT INTO kuaka_heartbeat VALUES ($i, UNIX_TIMESTAMP(NOW(6)))"
        sleep 0.1
    done
    wait "${bg_pids#* }" || true
    for _ in $(seq 60); do
        [[ $(pg dst_cdc "SELECT count(*) FROM kuaka_heartbeat") -ge $i ]] && break
        sleep 1
    done
    kill "$kuaka_pid" 2>/dev/null || true
    wait "$kuaka_pid" 2>/dev/null || true
    bg_pids=""
    tps=$(awk '/transactions:/ { gsub(/[()]/, "", $3); print $3 }' "$BENCH_DIR/sysbench.log")
    echo "CDC lag under sysbench oltp_write_only ($tps tx/s, 4 threads, $TABLES x $TABLE_SIZE rows), $i heartbeats:"
    pg dst_cdc "SELECT format('arrived %s of $i; lag p50 %s s, p99 %s s, max %s s',
        count(*),
        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM arrived) - sent)::numeric, 3),
        round(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM arrived) - sent)::numeric, 3),
        round(max(extract(epoch FROM arrived) - sent)::numeric, 3)) FROM kuaka_heartbeat"
fi
