#!/usr/bin/env bash
# bench/verify.sh — `kuaka verify` against data-diff and pt-table-checksum on the same data.
#
#   (1) MariaDB -> PostgreSQL, equal copies (made by `kuaka run --snapshot-only`):
#       `kuaka verify` (streamed, and with --server-digests) vs `data-diff` (PyPI data-diff
#       0.11, hashdiff over both databases); rows/s each and kuaka's ratio.
#   (2) MariaDB -> MariaDB (two databases of one server): `kuaka verify` vs
#       `pt-table-checksum` (per-chunk CRC32 checksums on the source, --recursion-method=none,
#       so only its checksum throughput is measured: it has no second database to compare).
#
#   (3) The employees sample (shared/datasets/employees: 6 tables, 130,783 rows; keys of
#       int, char, date and composite), MariaDB -> PostgreSQL: `kuaka verify` vs data-diff
#       table by table with each table's primary key; what each reports on the equal copy.
#   (4) A table keyed by text in a case-insensitive collation (WORDS rows, default 300,000,
#       `varchar COLLATE utf8mb4_general_ci` key), MariaDB -> PostgreSQL: `kuaka verify`
#       (one sorted pass per side); data-diff takes integer keys only.
#
# Data: sysbench `oltp_read_write prepare`, TABLES x TABLE_SIZE rows (default 1 x 2,000,000),
# and employees, in a private MariaDB 10.11 and a private PostgreSQL 15 on free ports,
# removed on exit.
#
# Usage: bench/verify.sh [-h]
# Environment:
#   TABLES=1 TABLE_SIZE=2000000   data size
#   JOBS=2                        kuaka --jobs (tables compared at once)
#   WORDS=300000                  rows of the text-keyed table
#   DATA_DIFF=/path/to/data-diff  (default: data-diff on PATH; install with
#       pip install 'data-diff[mysql,postgresql]' 'dbt-core<1.8' 'pydantic<2' 'mysql-connector-python<9')
#   SKIP_BUILD=1                  use target/release/kuaka as it is
#   KUAKA_SHARED_DIR=DIR          the shared/ folder holding datasets/employees (default:
#                                 ../shared beside the repository, or /work/shared)
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

TABLES=${TABLES:-1}
TABLE_SIZE=${TABLE_SIZE:-2000000}
JOBS=${JOBS:-2}
WORDS=${WORDS:-300000}
SKIP_BUILD=${SKIP_BUILD:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
DATA_DIFF=${DATA_DIFF:-$(command -v data-diff || true)}
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
KUAKA_BIN=${KUAKA_BIN:-$repo_dir/target/release/kuaka}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}
for tool in mariadbd mariadb-install-db mariadb sysbench pt-table-checksum; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install -y mariadb-server sysbench percona-toolkit)"
done
[[ -x $PGBIN/initdb ]] || die "no PostgreSQL 15 in $PGBIN"
[[ -n $DATA_DIFF && -x $DATA_DIFF ]] || die "data-diff missing (see -h)"
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
BENCH_DIR=$(mktemp -d /tmp/kuaka-bench-verify.XXXXXX)
chmod 755 "$BENCH_DIR"
MY_PORT=$(free_port 23406)
PG_PORT=$(free_port 25532)
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -f $BENCH_DIR/my/pid ]] && kill "$(cat "$BENCH_DIR/my/pid")" 2>/dev/null
    [[ -d $BENCH_DIR/pg ]] && as_postgres "$PGBIN/pg_ctl" -D "$BENCH_DIR/pg" -m fast -w stop >/dev/null 2>&1
    sleep 2
    rm -rf "$BENCH_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ((!SKIP_BUILD)); then
    log "cargo build --release"
    (cd "$repo_dir" && cargo build --release -q) || die "build failed"
fi

log "MariaDB on 127.0.0.1:$MY_PORT, PostgreSQL on 127.0.0.1:$PG_PORT (in $BENCH_DIR)"
mkdir -p "$BENCH_DIR/my"
mariadb-install-db --no-defaults --datadir="$BENCH_DIR/my/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >"$BENCH_DIR/my/install.log" 2>&1 ||
    die "mariadb-install-db failed"
mariadbd --no-defaults --datadir="$BENCH_DIR/my/data" --user=root --socket="$BENCH_DIR/my/sock" \
    --port="$MY_PORT" --bind-address=127.0.0.1 --log-bin="$BENCH_DIR/my/binlog" \
    --log-error="$BENCH_DIR/my/error.log" --pid-file="$BENCH_DIR/my/pid" --server-id=1 \
    --binlog-format=ROW --binlog-row-image=FULL --binlog-row-metadata=FULL --skip-name-resolve \
    --innodb-buffer-pool-size=2G --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 >/dev/null 2>&1 &
my() { mariadb --no-defaults --socket="$BENCH_DIR/my/sock" -uroot -N -B "$@"; }
for _ in $(seq 60); do my -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
my -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; CREATE DATABASE src; CREATE DATABASE dst;" ||
    die "MariaDB did not start (see $BENCH_DIR/my/error.log)"
chown postgres: "$BENCH_DIR" 2>/dev/null || true
as_postgres "$PGBIN/initdb" -D "$BENCH_DIR/pg" -U postgres -E UTF8 --locale=C --auth=trust >/dev/null ||
    die "initdb failed"
as_postgres "$PGBIN/pg_ctl" -D "$BENCH_DIR/pg" -l "$BENCH_DIR/pg.log" -w \
    -o "-p $PG_PORT -k $BENCH_DIR -c listen_addresses=127.0.0.1 -c shared_buffers=1GB -c max_wal_size=8GB" \
    start >/dev/null || die "PostgreSQL did not start"
pg() { "$PGBIN/psql" -X -q -tA -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -c "$2"; }
pg postgres "CREATE DATABASE dst"
SOURCE=mysql://root@127.0.0.1:$MY_PORT/src
PG_TARGET=postgres://postgres@127.0.0.1:$PG_PORT/dst
MY_TARGET=mysql://root@127.0.0.1:$MY_PORT/dst

log "sysbench prepare: $TABLES x $TABLE_SIZE rows"
sysbench oltp_read_write --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$MY_PORT" \
    --mysql-user=root --mysql-db=src --tables="$TABLES" --table-size="$TABLE_SIZE" \
    --threads=2 prepare >"$BENCH_DIR/prepare.log" 2>&1 || die "sysbench prepare failed"
rows=$((TABLES * TABLE_SIZE))
log "loading employees"
sed -n '/^CREATE TABLE/,/^flush/p' "$employees_dir/employee.sql" | sed '/^flush/d' | my src
for f in department employee dept_emp dept_manager title salary1; do
    if [[ -f $employees_dir/load_$f.sql ]]; then my src <"$employees_dir/load_$f.sql"; else gzip -dc "$employees_dir/load_$f.sql.gz" | my src; fi
done
employees=(employee department dept_emp dept_manager title salary)
log "making the text-keyed table: $WORDS rows"
my src -e "CREATE TABLE words (w varchar(40) COLLATE utf8mb4_general_ci PRIMARY KEY, n int, pad char(60));
    INSERT INTO words SELECT CONCAT(MD5(seq), '-', seq), seq, REPEAT('x', 50) FROM seq_1_to_$WORDS;
    ANALYZE TABLE words" >/dev/null
emp_rows=0
for t in "${employees[@]}"; do emp_rows=$((emp_rows + $(my src -e "SELECT count(*) FROM \`$t\`"))); done
log "copying to PostgreSQL and to MariaDB with kuaka"
"$KUAKA_BIN" run --no-progress --snapshot-only --jobs "$JOBS" --source "$SOURCE" --target "$PG_TARGET" \
    --state "$BENCH_DIR/state.pg" >"$BENCH_DIR/copy.pg.log" 2>&1 || die "copy to PostgreSQL failed"
"$KUAKA_BIN" run --no-progress --snapshot-only --jobs "$JOBS" --source "$SOURCE" --target "$MY_TARGET" \
    --state "$BENCH_DIR/state.my" >"$BENCH_DIR/copy.my.log" 2>&1 || die "copy to MariaDB failed"
pg dst "VACUUM ANALYZE"

timed() { # name, command... ; sets secs[name], rc[name]
    local name=$1 start end
    shift
    sync
    start=$(date +%s.%N)
    set +e
    "$@" >"$BENCH_DIR/$name.out" 2>&1
    rc[$name]=$?
    set -e
    end=$(date +%s.%N)
    secs[$name]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
    log "$name: ${secs[$name]} s (exit ${rc[$name]})"
}
declare -A secs rc

timed kuaka_pg "$KUAKA_BIN" verify --source "$SOURCE" --target "$PG_TARGET" --jobs "$JOBS" --tables 'sbtest*'
timed kuaka_pgsd "$KUAKA_BIN" verify --source "$SOURCE" --target "$PG_TARGET" --jobs "$JOBS" --server-digests --tables 'sbtest*'
tables=$(seq -f 'sbtest%g' 1 "$TABLES")
dd_total=0
for t in $tables; do
    timed "datadiff_$t" "$DATA_DIFF" "mysql://root@127.0.0.1:$MY_PORT/src" "$t" \
        "postgresql://postgres:x@127.0.0.1:$PG_PORT/dst" "$t" -k id -c k -c c -c pad -j "$JOBS"
    dd_total=$(awk -v a="$dd_total" -v b="${secs[datadiff_$t]}" 'BEGIN { printf "%.2f", a + b }')
done
secs[datadiff]=$dd_total
timed kuaka_my "$KUAKA_BIN" verify --source "$SOURCE" --target "$MY_TARGET" --jobs "$JOBS" --tables 'sbtest*'
timed ptchecksum pt-table-checksum --no-check-binlog-format --no-check-replication-filters \
    --recursion-method=none --databases src --tables "$(seq -s, -f 'src.sbtest%g' 1 "$TABLES")" \
    "h=127.0.0.1,P=$MY_PORT,u=root"
# Employees: kuaka on all six tables at once; data-diff table by table, with the table's
# primary key (it takes integer keys only, and says so for the others).
timed kuaka_emp "$KUAKA_BIN" verify --source "$SOURCE" --target "$PG_TARGET" --jobs "$JOBS" \
    --exclude 'sbtest*' --exclude words --json
emp_equal=$(grep -c '"equal": true' "$BENCH_DIR/kuaka_emp.out" || true)
emp_diffs=$(grep -c '"kind"' "$BENCH_DIR/kuaka_emp.out" || true)
declare -A dd_result
dd_emp_total=0
for t in "${employees[@]}"; do
    keys=$(my -e "SELECT GROUP_CONCAT(CONCAT('-k ', column_name) ORDER BY ordinal_position SEPARATOR ' ') FROM information_schema.key_column_usage WHERE table_schema = 'src' AND table_name = '$t' AND constraint_name = 'PRIMARY'")
    # shellcheck disable=SC2086 # one word per flag
    timed "dd_emp_$t" "$DATA_DIFF" "mysql://root@127.0.0.1:$MY_PORT/src" "$t" \
        "postgresql://postgres:x@127.0.0.1:$PG_PORT/dst" "$t" $keys -c '%' -j "$JOBS"
    dd_emp_total=$(awk -v a="$dd_emp_total" -v b="${secs[dd_emp_$t]}" 'BEGIN { printf "%.2f", a + b }')
    if grep -q "Cannot use a column of type" "$BENCH_DIR/dd_emp_$t.out"; then
        dd_result[$t]="refused: $(grep -o 'Cannot use a column of type [A-Za-z]*' "$BENCH_DIR/dd_emp_$t.out" | head -1) as a key"
    elif ((rc[dd_emp_$t] != 0)); then
        dd_result[$t]="failed (exit ${rc[dd_emp_$t]}, see $BENCH_DIR/dd_emp_$t.out)"
    else
        dd_result[$t]="reported $(grep -c '^- ' "$BENCH_DIR/dd_emp_$t.out" || true) source rows (-) and $(grep -c '^+ ' "$BENCH_DIR/dd_emp_$t.out" || true) target rows (+) as differing"
    fi
done

rate() { awk -v r="$rows" -v s="$1" 'BEGIN { printf "%.0f", r / s }'; }
echo
echo "verify: $rows rows (sysbench $TABLES x $TABLE_SIZE), JOBS=$JOBS, one 2-core machine"
printf '%-34s %9s %12s  %s\n' "tool" seconds rows/s "exit"
printf '%-34s %9s %12s  %s\n' "kuaka verify MariaDB -> PG" "${secs[kuaka_pg]}" "$(rate "${secs[kuaka_pg]}")" "${rc[kuaka_pg]}"
printf '%-34s %9s %12s  %s\n' "  same, --server-digests" "${secs[kuaka_pgsd]}" "$(rate "${secs[kuaka_pgsd]}")" "${rc[kuaka_pgsd]}"
printf '%-34s %9s %12s  %s\n' "data-diff MariaDB -> PG" "${secs[datadiff]}" "$(rate "${secs[datadiff]}")" "see $BENCH_DIR/datadiff_*.out"
printf '%-34s %9s %12s  %s\n' "kuaka verify MariaDB -> MariaDB" "${secs[kuaka_my]}" "$(rate "${secs[kuaka_my]}")" "${rc[kuaka_my]}"
printf '%-34s %9s %12s  %s\n' "pt-table-checksum (source only)" "${secs[ptchecksum]}" "$(rate "${secs[ptchecksum]}")" "${rc[ptchecksum]}"
echo "kuaka / data-diff rows/s: $(awk -v a="${secs[datadiff]}" -v b="${secs[kuaka_pg]}" 'BEGIN { printf "%.2fx", a / b }')"
echo "kuaka / pt-table-checksum rows/s: $(awk -v a="${secs[ptchecksum]}" -v b="${secs[kuaka_my]}" 'BEGIN { printf "%.2fx", a / b }')"
timed kuaka_words "$KUAKA_BIN" verify --source "$SOURCE" --target "$PG_TARGET" --tables words
echo
echo "text key (varchar utf8mb4_general_ci), $WORDS rows, MariaDB -> PostgreSQL, equal copies:"
printf '  kuaka verify: %s s (%s rows/s), exit %s; data-diff: integer keys only\n' \
    "${secs[kuaka_words]}" "$(awk -v r="$WORDS" -v s="${secs[kuaka_words]}" 'BEGIN { printf "%.0f", r / s }')" \
    "${rc[kuaka_words]}"
echo
echo "employees: ${#employees[@]} tables, $emp_rows rows, MariaDB -> PostgreSQL, equal copies"
printf '  kuaka verify: %s s, %s, %s differences reported\n' "${secs[kuaka_emp]}" \
    "$( ((emp_equal > 0)) && echo equal || echo "NOT equal (exit ${rc[kuaka_emp]})")" "$emp_diffs"
printf '  data-diff: %s s over the tables, one by one:\n' "$dd_emp_total"
for t in "${employees[@]}"; do printf '    %-13s %6s s  %s\n' "$t" "${secs[dd_emp_$t]}" "${dd_result[$t]}"; done
for name in datadiff_sbtest1 ptchecksum; do
    [[ -f $BENCH_DIR/$name.out ]] && { echo "--- $name (last lines)"; tail -n 4 "$BENCH_DIR/$name.out"; }
done
