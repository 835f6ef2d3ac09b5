#!/usr/bin/env bash
# bench/pg_snapshot.sh — time a one-shot PostgreSQL -> PostgreSQL copy by
#   (1) kuaka run --snapshot-only
#   (2) pgcopydb clone
#   (3) pg_dump -Fp | psql
# on the same source data, each into a fresh empty target database, and print
# wall time, rows/s, MB/s, peak client RSS and kuaka's speedup over each peer.
#
# Data: one source database `src` holding pgbench (`pgbench -i -s $SCALE`,
# public.pgbench_*) plus pagila (schema + data from $PAGILA_DIR), both in
# schema public (they don't collide).
#
# Server: a private PostgreSQL 15 cluster in a temp dir, on a free port
# (never the machine's own server on 5432), trust auth on 127.0.0.1 and its
# own socket dir, stopped and removed on exit (also on Ctrl-C or error).
#
# CAVEAT: source and targets are databases of this ONE cluster, so the source
# reads and the target writes (COPY, index builds, WAL, checkpoints) share
# the machine's cores, memory and disk. That is the same for every tool, so
# the ratios are fair, but absolute numbers are lower than with two servers.
#
# Fairness: every tool gets the same parallelism (JOBS, default 2):
#   kuaka    --jobs $JOBS
#   pgcopydb --table-jobs $JOBS --index-jobs $JOBS, and
#            --split-tables-larger-than $PGCOPYDB_SPLIT (default 64MB, the
#            same as kuaka's default chunk size) so that pgcopydb too can copy
#            one big table (pgbench_accounts) with several workers.
#   pg_dump | psql is serial by nature (plain format has no parallel mode).
# Before each run the previous target is dropped, a CHECKPOINT is taken and the OS
# writes back dirty pages (sync), so one run's I/O does not spill into the next.
#
# Measures, per tool:
#   seconds     wall time of the whole command (schema, data, indexes, ...);
#               the median over REPEAT runs
#   rows/s      rows of all source tables in schema public / seconds
#   MB/s        sum of pg_total_relation_size (heap+toast+indexes) of those
#               tables / seconds (MB = 2^20 bytes)
#   peak RSS    "Maximum resident set size" from GNU /usr/bin/time -v: the
#               largest single process of the tool's process tree (client
#               side only; server backends are not counted). For
#               pg_dump | psql, both run the whole time, so it is the sum of
#               the two.
#   accounts    pgbench_accounts row count on the target vs the source
#   rows        total rows in public on the target vs the source
#   indexes     index count in public on the target vs the source
# A run counts as ok only if the tool exited 0 and pgbench_accounts and the
# total row count match; speedups (peer_seconds / kuaka_seconds) are printed
# only between runs that are ok.
#
# Usage: bench/pg_snapshot.sh [--keep] [--skip-build] [-h]
# Environment:
#   SCALE=50           pgbench scale (50 = 5M pgbench_accounts rows)
#   JOBS=2             parallelism for every tool
#   REPEAT=1           runs per tool (round-robin); the median time is shown,
#                      with all times listed below the table
#   TOOLS="kuaka pgcopydb pgdump"   which tools to run, in this order
#   KEEP=1 / --keep    keep the cluster dir (and its source db) for reruns;
#                      the server is stopped on exit either way
#   BENCH_DIR=dir      cluster dir (default: mktemp, or
#                      /tmp/kuaka-bench-pg with KEEP=1)
#   SKIP_BUILD=1       don't run `cargo build --release`
#   KUAKA_BIN=path     kuaka binary (default target/release/kuaka)
#   KUAKA_ARGS="..."   extra arguments for kuaka run
#   PGCOPYDB_SPLIT=64MB  pgcopydb --split-tables-larger-than value
#   PAGILA_DIR=dir     pagila-schema.sql and pagila-data.sql.gz
#   PGBIN=dir          PostgreSQL 15 binaries (/usr/lib/postgresql/15/bin)
#   PORT=n             first port to try (default 55432)
#   TOOL_TIMEOUT=3600  seconds before a tool run is killed (reported FAILED(rc=124))
#   OUT=file           also write the result table to this file
# Needs: PostgreSQL 15 server binaries, pgcopydb, GNU time
#   (apt-get install -y postgresql-15 pgcopydb time).

set -euo pipefail

# ---------------------------------------------------------------- settings --
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

SCALE=${SCALE:-50}
JOBS=${JOBS:-2}
REPEAT=${REPEAT:-1}
TOOLS=${TOOLS:-"kuaka pgcopydb pgdump"}
KEEP=${KEEP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGCOPYDB_SPLIT=${PGCOPYDB_SPLIT:-64MB}
KUAKA_BIN=${KUAKA_BIN:-$repo_dir/target/release/kuaka}
KUAKA_ARGS=${KUAKA_ARGS:-}
PORT=${PORT:-55432}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-3600}
OUT=${OUT:-}
if [[ -z ${PAGILA_DIR:-} ]]; then
    PAGILA_DIR=$repo_dir/../shared/datasets/pagila
    [[ -d $PAGILA_DIR ]] || PAGILA_DIR=/work/shared/datasets/pagila
fi

while (($#)); do
    case $1 in
        --keep) KEEP=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h | --help)
            sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "SCALE must be a positive integer"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"
[[ $TOOL_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "TOOL_TIMEOUT must be a positive integer"
for t in $TOOLS; do
    case $t in kuaka | pgcopydb | pgdump) ;; *) die "unknown tool in TOOLS: $t" ;; esac
done
[[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl ]] || die "no PostgreSQL 15 server binaries in $PGBIN (apt-get install -y postgresql-15)"
[[ -x /usr/bin/time ]] || die "GNU time missing (apt-get install -y time)"
if [[ " $TOOLS " == *" pgcopydb "* ]]; then
    command -v pgcopydb >/dev/null || die "pgcopydb missing (apt-get install -y pgcopydb)"
fi
[[ -f $PAGILA_DIR/pagila-schema.sql && -f $PAGILA_DIR/pagila-data.sql.gz ]] ||
    die "pagila files not found in $PAGILA_DIR (set PAGILA_DIR)"

# pgcopydb runs pg_dump/pg_restore: make sure it finds the 15 ones.
export PATH=$PGBIN:$PATH
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE

# Run a command as the cluster's OS owner (initdb refuses root).
as_owner() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ----------------------------------------------------------------- cluster --
made_dir=0 # 1: the whole BENCH_DIR is ours to remove
if [[ -n ${BENCH_DIR:-} ]]; then
    mkdir -p "$BENCH_DIR"
elif ((KEEP)); then
    BENCH_DIR=/tmp/kuaka-bench-pg
    mkdir -p "$BENCH_DIR"
else
    BENCH_DIR=$(mktemp -d /tmp/kuaka-bench-pg.XXXXXX)
    made_dir=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
PGDATA_DIR=$BENCH_DIR/data
SOCK_DIR=$BENCH_DIR/sock
WORK_DIR=$BENCH_DIR/work
LOG_DIR=$BENCH_DIR/logs
server_started=0

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if ((server_started)); then
        log "stopping the benchmark cluster"
        as_owner "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null 2>&1 ||
            as_owner "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1
    fi
    if ((KEEP)); then
        log "kept $BENCH_DIR (logs in $LOG_DIR)"
    elif ((made_dir)); then
        rm -rf "$BENCH_DIR"
    else
        # A BENCH_DIR given by the user: remove only what this script made in it.
        rm -rf "$PGDATA_DIR" "$SOCK_DIR" "$WORK_DIR" "$LOG_DIR" "$BENCH_DIR/server.log"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$SOCK_DIR" "$WORK_DIR" "$LOG_DIR"
if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "running as root needs an OS user 'postgres' to own the cluster"
    chown postgres: "$BENCH_DIR" "$SOCK_DIR"
fi

# ------------------------------------------------------------- kuaka build --
kuaka_build_failed=0
if [[ " $TOOLS " == *" kuaka "* ]] && ((!SKIP_BUILD)); then
    log "cargo build --release (log: $LOG_DIR/cargo.log)"
    if ! (cd "$repo_dir" && cargo build --release) >"$LOG_DIR/cargo.log" 2>&1; then
        tail -n 20 "$LOG_DIR/cargo.log" >&2
        log "kuaka build FAILED; kuaka will be reported as failed"
        kuaka_build_failed=1
    fi
fi

port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
while port_in_use "$PORT" || ((PORT == 5432)); do
    PORT=$((PORT + 1))
    ((PORT < 65000)) || die "no free port found"
done

if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
    log "initdb in $PGDATA_DIR"
    rm -rf "$PGDATA_DIR"
    as_owner "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres -E UTF8 --locale=C \
        --auth=trust >"$LOG_DIR/initdb.log" 2>&1 || {
        cat "$LOG_DIR/initdb.log" >&2
        die "initdb failed"
    }
    as_owner tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<EOF

# --- kuaka bench/pg_snapshot.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK_DIR'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_connections = 100
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
EOF
    as_owner tee "$PGDATA_DIR/pg_hba.conf" >/dev/null <<'EOF'
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   trust
host    replication  all   127.0.0.1/32   trust
EOF
fi

log "starting PostgreSQL 15 on 127.0.0.1:$PORT"
server_started=1 # from here on, cleanup tries to stop it
as_owner "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$BENCH_DIR/server.log" -w -t 120 \
    -o "-p $PORT -k $SOCK_DIR" start >/dev/null || {
    tail -n 30 "$BENCH_DIR/server.log" >&2
    die "pg_ctl start failed"
}

url() { printf 'postgresql://postgres@127.0.0.1:%s/%s' "$PORT" "$1"; }
# psql -c on database $1, unaligned tuples only, stop on error.
q() { PGOPTIONS='-c client_min_messages=warning' "$PGBIN/psql" -X -q -tA -v ON_ERROR_STOP=1 -d "$(url "$1")" -c "$2"; }

log "server: $(q postgres 'select version()')"

# ------------------------------------------------------------------ source --
marker="kuaka-bench pgbench scale=$SCALE + pagila"
have=$(q postgres "select shobj_description(oid, 'pg_database') from pg_database where datname = 'src'")
if [[ $have == "$marker" ]]; then
    log "reusing source database src ($marker)"
else
    log "building source database src: pagila + pgbench -i -s $SCALE"
    q postgres "drop database if exists src with (force)" >/dev/null
    q postgres "create database src template template0" >/dev/null
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$(url src)" \
        -f "$PAGILA_DIR/pagila-schema.sql" >"$LOG_DIR/pagila.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/pagila.log" >&2
        die "loading pagila-schema.sql failed"
    }
    gzip -dc "$PAGILA_DIR/pagila-data.sql.gz" |
        "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$(url src)" >>"$LOG_DIR/pagila.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/pagila.log" >&2
        die "loading pagila-data.sql.gz failed"
    }
    "$PGBIN/pgbench" -i -q -s "$SCALE" -d "$(url src)" >"$LOG_DIR/pgbench.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/pgbench.log" >&2
        die "pgbench -i failed"
    }
    q src "vacuum analyze" >/dev/null
    q postgres "comment on database src is '$marker'" >/dev/null
fi

# SQL: leaf tables of schema public (partitioned parents hold no rows).
tables_sql="from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = 'public' and c.relkind = 'r'"
# Exact total row count of those tables.
# On a target, only the source's tables count (a tool's own bookkeeping tables don't).
count_rows() {
    q "$1" "select coalesce(sum((xpath('/row/c/text()', query_to_xml(
                format('select count(*) as c from %I.%I', n.nspname, c.relname),
                false, true, '')))[1]::text::bigint), 0) $tables_sql ${2:-}"
}
count_tables() { q "$1" "select count(*) $tables_sql"; }
count_indexes() {
    q "$1" "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid
            join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public'"
}
# pgbench_accounts row count, or "missing".
count_accounts() {
    local n
    if n=$(q "$1" "select count(*) from public.pgbench_accounts" 2>/dev/null); then
        echo "$n"
    else
        echo missing
    fi
}

SRC_ROWS=$(count_rows src)
SRC_TABLE_FILTER="and c.relname in ($(q src "select string_agg(quote_literal(c.relname), ',') $tables_sql"))"
SRC_TABLES=$(count_tables src)
SRC_INDEXES=$(count_indexes src)
SRC_ACCOUNTS=$(count_accounts src)
SRC_BYTES=$(q src "select sum(pg_total_relation_size(c.oid)) $tables_sql")
SRC_DBBYTES=$(q src "select pg_database_size(current_database())")
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
log "source: $SRC_TABLES tables, $SRC_ROWS rows ($SRC_ACCOUNTS in pgbench_accounts), $SRC_INDEXES indexes, $(mb "$SRC_BYTES") MB in tables+indexes (pg_database_size $(mb "$SRC_DBBYTES") MB)"

# ------------------------------------------------------------------- runs --
declare -A R_ALL R_SECS R_RSS R_STATUS R_ACC R_ROWS R_IDX R_NOTE
# "Maximum resident set size" (KB) from a GNU time -v output file.
rss_kb() { awk -F': *' '/Maximum resident set size/ { print $2 }' "$1" 2>/dev/null || true; }

fresh_target() {
    q postgres "drop database if exists \"$1\" with (force)" >/dev/null
    q postgres "create database \"$1\" template template0" >/dev/null
}

run_tool() {
    local tool=$1 dst="dst_$1" tlog="$LOG_DIR/$1.log" tfile="$LOG_DIR/$1.time"
    local rc=0 t0 t1 rss="" note=""
    log "=== $tool: copying src -> $dst (log: $tlog)"
    # Drop every earlier target so its WAL/dirty pages don't bill this run.
    local d
    for d in $(q postgres "select datname from pg_database where datname like 'dst\_%'"); do
        q postgres "drop database \"$d\" with (force)" >/dev/null
    done
    fresh_target "$dst"
    q postgres "checkpoint" >/dev/null
    # Let the OS write back the previous run's files so they do not slow this one.
    sync
    sync

    # GNU time reports the max RSS over timeout and the tool it waits for.
    local -a tmo=(timeout -k 30 "$TOOL_TIMEOUT")
    t0=$(date +%s%N)
    case $tool in
        kuaka)
            local state="$WORK_DIR/kuaka-state"
            rm -rf "$state"
            mkdir -p "$state"
            local -a extra=()
            [[ -n $KUAKA_ARGS ]] && read -ra extra <<<"$KUAKA_ARGS"
            if ((kuaka_build_failed)); then
                rc=1 note="build failed"
                echo "cargo build --release failed, see $LOG_DIR/cargo.log" >"$tlog"
            elif [[ ! -x $KUAKA_BIN ]]; then
                rc=1 note="no binary"
                echo "no kuaka binary at $KUAKA_BIN" >"$tlog"
            else
                /usr/bin/time -v -o "$tfile" "${tmo[@]}" "$KUAKA_BIN" run --source "$(url src)" \
                    --target "$(url "$dst")" --state "$state" --snapshot-only \
                    --jobs "$JOBS" "${extra[@]}" >"$tlog" 2>&1 || rc=$?
                rss=$(rss_kb "$tfile")
            fi
            ;;
        pgcopydb)
            local pdir="$WORK_DIR/pgcopydb"
            rm -rf "$pdir"
            /usr/bin/time -v -o "$tfile" "${tmo[@]}" pgcopydb clone --source "$(url src)" \
                --target "$(url "$dst")" --dir "$pdir" \
                --table-jobs "$JOBS" --index-jobs "$JOBS" \
                --split-tables-larger-than "$PGCOPYDB_SPLIT" \
                --no-owner --no-acl >"$tlog" 2>&1 || rc=$?
            rss=$(rss_kb "$tfile")
            ;;
        pgdump)
            (
                set -o pipefail
                /usr/bin/time -v -o "$tfile.dump" "${tmo[@]}" "$PGBIN/pg_dump" -Fp -d "$(url src)" 2>"$tlog.dump" |
                    /usr/bin/time -v -o "$tfile.psql" "${tmo[@]}" "$PGBIN/psql" -X -q -v ON_ERROR_STOP=0 \
                        -d "$(url "$dst")" >"$tlog" 2>"$tlog.err"
            ) || rc=$?
            local r1 r2
            r1=$(rss_kb "$tfile.dump") r2=$(rss_kb "$tfile.psql")
            rss=$((${r1:-0} + ${r2:-0}))
            local nerr
            nerr=$(grep -c 'ERROR:' "$tlog.err" || true)
            note="psql errors: $nerr"
            if ((nerr > 0)); then
                log "psql reported $nerr error(s); first ones:"
                grep 'ERROR:' "$tlog.err" | head -n 5 >&2
            fi
            ;;
    esac
    t1=$(date +%s%N)

    local secs acc rows idx status
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    acc=$(count_accounts "$dst")
    rows=$(count_rows "$dst" "$SRC_TABLE_FILTER" 2>/dev/null || echo "?")
    idx=$(count_indexes "$dst" 2>/dev/null || echo "?")
    if ((rc == 124)); then
        status="FAILED(timeout ${TOOL_TIMEOUT}s)"
    elif ((rc != 0)); then
        status="FAILED(rc=$rc)"
    elif [[ $acc != "$SRC_ACCOUNTS" || $rows != "$SRC_ROWS" ]]; then
        status="ROWS-MISMATCH"
    else
        status=ok
    fi
    log "$tool: $status in ${secs}s; pgbench_accounts $acc/$SRC_ACCOUNTS, rows $rows/$SRC_ROWS, indexes $idx/$SRC_INDEXES${note:+; $note}"
    if [[ $status != ok ]]; then
        log "last lines of $tool's log:"
        tail -n 25 "$tlog" >&2 || true
        [[ -f $tlog.err ]] && tail -n 10 "$tlog.err" >&2
    fi
    # Aggregate over REPEAT runs: all times kept (median reported), max RSS; the
    # first bad run's status and counts stick.
    R_ALL[$tool]+="$secs "
    if [[ -n $rss ]] && ((rss > ${R_RSS[$tool]:-0})); then R_RSS[$tool]=$rss; fi
    if [[ ${R_STATUS[$tool]:-ok} == ok ]]; then
        R_STATUS[$tool]=$status R_ACC[$tool]=$acc R_ROWS[$tool]=$rows
        R_IDX[$tool]=$idx R_NOTE[$tool]=$note
    fi
    q postgres "drop database if exists \"$dst\" with (force)" >/dev/null
}

# Median of the numbers in $1.
median() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Other load (a compiler, a test suite) skews every number: sample the CPU for
# a second between runs (our own server is idle then) and say so.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }'
}
busy_check() {
    local pct others
    pct=$(cpu_busy_pct 2>/dev/null || echo 0)
    others=$(pgrep -x 'cargo|rustc' | wc -l || true)
    if ((others > 0 || pct > 35)); then
        log "WARNING: machine busy before this run (CPU ${pct}% busy, $others cargo/rustc processes): timings will be noisy"
        BUSY_SEEN=1
    fi
}
BUSY_SEEN=0

# Round-robin over the tools, REPEAT rounds, so drift hits every tool alike.
for ((round = 1; round <= REPEAT; round++)); do
    ((REPEAT == 1)) || log "--- round $round of $REPEAT"
    for t in $TOOLS; do
        busy_check
        run_tool "$t"
    done
done
for t in $TOOLS; do
    R_SECS[$t]=$(median "${R_ALL[$t]}")
done

# ----------------------------------------------------------------- report --
label() {
    case $1 in
        kuaka) echo "kuaka" ;;
        pgcopydb) echo "pgcopydb clone" ;;
        pgdump) echo "pg_dump | psql" ;;
    esac
}
report() {
    echo
    echo "PostgreSQL -> PostgreSQL snapshot copy, one PG 15 cluster (source and targets share it), JOBS=$JOBS, REPEAT=$REPEAT (median)"
    echo "source: pgbench scale $SCALE + pagila: $SRC_TABLES tables, $SRC_ROWS rows ($SRC_ACCOUNTS pgbench_accounts), $SRC_INDEXES indexes, $(mb "$SRC_BYTES") MB tables+indexes (pg_database_size $(mb "$SRC_DBBYTES") MB)"
    [[ " $TOOLS " != *" pgcopydb "* ]] || echo "pgcopydb: $(pgcopydb --version 2>/dev/null | awk '/^pgcopydb version/ { print $3 }'), --table-jobs $JOBS --index-jobs $JOBS --split-tables-larger-than $PGCOPYDB_SPLIT"
    echo
    printf '%-16s %9s %11s %8s %12s  %-15s %-17s %-9s %s\n' \
        tool seconds rows/s MB/s "peak RSS MB" accounts "rows" indexes status
    local t rps mbps
    for t in $TOOLS; do
        if [[ ${R_STATUS[$t]} == ok ]]; then
            rps=$(awk -v r="$SRC_ROWS" -v s="${R_SECS[$t]}" 'BEGIN { printf "%.0f", r / s }')
            mbps=$(awk -v b="$SRC_BYTES" -v s="${R_SECS[$t]}" 'BEGIN { printf "%.1f", b / 1048576 / s }')
        else
            rps=- mbps=-
        fi
        printf '%-16s %9s %11s %8s %12s  %-15s %-17s %-9s %s\n' "$(label "$t")" \
            "${R_SECS[$t]}" "$rps" "$mbps" "$(awk -v k="${R_RSS[$t]}" 'BEGIN { if (k == "") print "-"; else printf "%.1f", k / 1024 }')" \
            "${R_ACC[$t]}/$SRC_ACCOUNTS" "${R_ROWS[$t]}/$SRC_ROWS" "${R_IDX[$t]}/$SRC_INDEXES" \
            "${R_STATUS[$t]}${R_NOTE[$t]:+ (${R_NOTE[$t]})}"
    done
    ((!BUSY_SEEN)) || echo "WARNING: other load was running during the runs (see log above); timings are noisy"
    if ((REPEAT > 1)); then
        for t in $TOOLS; do
            printf '  %-16s all runs (s): %s\n' "$(label "$t")" "${R_ALL[$t]% }"
        done
    fi
    if [[ " $TOOLS " == *" kuaka "* ]]; then
        local line="speedup (peer seconds / kuaka seconds):" p
        for p in pgcopydb pgdump; do
            [[ " $TOOLS " == *" $p "* ]] || continue
            if [[ ${R_STATUS[kuaka]} != ok ]]; then
                line+="  vs $(label "$p"): n/a (kuaka ${R_STATUS[kuaka]})"
            elif [[ ${R_STATUS[$p]} != ok ]]; then
                line+="  vs $(label "$p"): n/a ($p ${R_STATUS[$p]})"
            else
                line+="  vs $(label "$p"): $(awk -v a="${R_SECS[$p]}" -v b="${R_SECS[kuaka]}" 'BEGIN { printf "%.2fx", a / b }')"
            fi
        done
        echo "$line"
    fi
}
report_text=$(report)
printf '%s\n' "$report_text"
if [[ -n $OUT ]]; then
    printf '%s\n' "$report_text" >"$OUT"
fi

# Non-zero exit if any run failed, after printing everything.
for t in $TOOLS; do
    [[ ${R_STATUS[$t]} == ok ]] || exit 1
done
