#!/usr/bin/env bash
# bench/pg_cdc.sh — change streaming PostgreSQL -> PostgreSQL while the source works:
# each tool copies a snapshot of `src` into an empty `dst` and then streams the
# changes; once it streams, two workloads run on the source:
#   W1  pgbench tpcb-like, -c $CLIENTS -j 2 -T $DURATION, flat out
#   W2  an insert-only stream of $INSERT_ROWS rows into `ins`, in transactions of
#       $INSERT_BATCH rows (INSERT ... SELECT generate_series), as fast as the
#       source takes them
# and it prints apply rates, replication lag p50/p99/max, peak client RSS and
# whether the target matches the source, for
#   kuaka     kuaka run (snapshot, then logical replication with pgoutput),
#             --apply-mode $APPLY_MODE
#   pgcopydb  pgcopydb clone --follow (snapshot, then logical decoding,
#             transformed to SQL and applied): the peer, OFF by default (see
#             "Peer" below)
# with kuaka/pgcopydb ratios, and whether kuaka meets the targets of the issue:
# lag p99 < 1 s while pgbench runs flat out, W2 applied at >= 50,000 rows/s,
# peak RSS < 200 MB.
#
# Lag: a marker row (`marker(id bigserial, t timestamptz default
# clock_timestamp())`) is inserted and committed on the source every
# $MARKER_MS ms during both workloads. On the target a deferred constraint
# trigger on `marker`, ENABLE ALWAYS (so it fires under the
# session_replication_role = replica that apply sessions use), records
# clock_timestamp() at the commit of the transaction that brought the row into
# kuaka_bench.arrival. Lag of a marker = arrival - t: the time from the insert
# on the source until the row is committed (visible) on the target. Source and
# target are databases of one cluster, so both stamps come from the same clock
# and no polling error enters. Percentiles are over markers (10 per second).
#
# Apply rates:
#   W1 changes/s  source row changes of W1 (4 per pgbench transaction: 3
#                 UPDATEs + 1 INSERT, plus the markers) / seconds from the
#                 start of pgbench until the target holds all of them (so a
#                 tool that keeps up shows the source's rate; "target done
#                 after pgbench" is how long the target needed after pgbench
#                 ended, polled every 100 ms). For kuaka, its
#                 own applied_changes counter (kuaka status) over W1 is shown
#                 too; it counts net changes per batch, so it can be lower.
#   W2 rows/s     INSERT_ROWS / seconds from the first INSERT on the source
#                 until the target holds every row (polled every 100 ms: an
#                 index probe for the last id, then count(*)). The source's own
#                 insert time and rate are shown beside it.
# Peak RSS: "Maximum resident set size" from GNU /usr/bin/time -v, i.e. the
# largest single process of the tool's process tree (client side only).
# Verify: after both workloads, row counts and sums of pgbench_accounts,
# _tellers, _branches, _history, ins and marker on the target vs the source.
#
# Server: a private PostgreSQL 15 cluster in a temp dir on a free port (never
# the machine's own server on 5432), trust auth on 127.0.0.1 and its own socket
# dir, wal_level=logical, max_replication_slots=10, max_wal_senders=10; stopped
# and removed on exit (also on Ctrl-C or error). Each tool gets a fresh `src`
# (copied from a template built once) and a fresh empty `dst`.
#
# CAVEAT: source and target are databases of this ONE cluster on this ONE
# machine (2 cores here), which also runs pgbench and the tool. pgbench "flat
# out" therefore competes with capture and apply for the same CPU and disk, so
# absolute numbers are lower (and lag higher) than with separate servers, and
# the pgbench tps each tool sees differs with how much CPU the tool takes.
# Compare tools run on the same machine and settings.
#
# Peer: NOT RUN BY DEFAULT, because the pgcopydb that can be installed here
# (Debian 12's 0.10, which decodes with wal2json: apt-get install -y pgcopydb
# postgresql-15-wal2json) cannot stream these workloads. Tried with this
# script (TOOLS=pgcopydb): the snapshot and the start of streaming work, but
#  - with pgbench -c 4 its transform step fails at once with "BUG: logical
#    message xid is N, which is different from the current transaction xid
#    N-1" / "Failed to parse JSON message" and nothing more is applied;
#  - even with pgbench -c 1, its apply step stops at the first WAL segment
#    boundary: it replays the same 000...1B.sql file every 10 s, replay_lsn
#    never moves, and the rest of the changes never reach the target
#    (0.10 does not handle a transaction stream that goes on in the next WAL
#    segment's file; later pgcopydb versions reworked this).
#  - it also ignores SIGTERM while in that state (killed after 30 s).
# So by default only kuaka's numbers are printed. With a newer pgcopydb
# (one whose clone has --plugin; test_decoding is then used), TOOLS="kuaka
# pgcopydb" runs both and prints kuaka/pgcopydb ratios; the script stops
# waiting for pgcopydb as soon as its log shows an ERROR. If pgcopydb is
# missing, or wal2json is missing for a pgcopydb without --plugin, it is
# skipped. Note pgcopydb's pipeline goes through JSON and SQL files on disk.
#
# Usage: bench/pg_cdc.sh [--keep] [-h]
# Environment:
#   SCALE=10           pgbench scale of the source (10 = 1M pgbench_accounts rows)
#   DURATION=60        W1: pgbench seconds
#   CLIENTS=4          W1: pgbench clients (-c; -j 2)
#   INSERT_ROWS=1000000  W2: rows inserted
#   INSERT_BATCH=10000   W2: rows per INSERT transaction
#   MARKER_MS=100      marker interval in milliseconds
#   APPLY_MODE=transactional   kuaka --apply-mode (transactional | per-key)
#   APPLY_WORKERS=4    kuaka --apply-workers (with APPLY_MODE=per-key only)
#   TOOLS=kuaka        which tools to run, in this order ("kuaka pgcopydb"
#                      adds the peer; see "Peer" above)
#   KUAKA_BIN=path     kuaka binary (default target/release/kuaka; this script
#                      does not build it: cargo build --release first)
#   KUAKA_ARGS="..."   extra arguments for kuaka run
#   KEEP=1 / --keep    keep the cluster dir (with the source template and the
#                      logs) for reruns; the server is stopped on exit either way
#   BENCH_DIR=dir      cluster dir (default: mktemp, or /tmp/kuaka-bench-cdc
#                      with KEEP=1)
#   PGBIN=dir          PostgreSQL 15 binaries (/usr/lib/postgresql/15/bin)
#   PORT=n             first port to try (default 55532)
#   WAIT_TIMEOUT=900   seconds to wait for a tool to get streaming or to catch up
#   OUT=file           also write the result table to this file
# Exit status: 0 if every tool ran and its target matched the source (missed
# targets are reported, not an error), 1 otherwise.
# Needs: PostgreSQL 15 server binaries and pgbench, GNU time, jq; pgcopydb and
#   wal2json for the peer
#   (apt-get install -y postgresql-15 time jq pgcopydb postgresql-15-wal2json).

set -euo pipefail

# ---------------------------------------------------------------- settings --
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

SCALE=${SCALE:-10}
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-4}
INSERT_ROWS=${INSERT_ROWS:-1000000}
INSERT_BATCH=${INSERT_BATCH:-10000}
MARKER_MS=${MARKER_MS:-100}
APPLY_MODE=${APPLY_MODE:-transactional}
APPLY_WORKERS=${APPLY_WORKERS:-4}
TOOLS=${TOOLS:-kuaka}
KUAKA_BIN=${KUAKA_BIN:-$repo_dir/target/release/kuaka}
KUAKA_ARGS=${KUAKA_ARGS:-}
KEEP=${KEEP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-55532}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-900}
OUT=${OUT:-}

while (($#)); do
    case $1 in
        --keep) KEEP=1 ;;
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

for v in SCALE DURATION CLIENTS INSERT_ROWS INSERT_BATCH MARKER_MS APPLY_WORKERS WAIT_TIMEOUT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
((INSERT_ROWS % INSERT_BATCH == 0)) || die "INSERT_ROWS must be a multiple of INSERT_BATCH"
case $APPLY_MODE in transactional | per-key) ;; *) die "APPLY_MODE must be transactional or per-key" ;; esac
for t in $TOOLS; do
    case $t in kuaka | pgcopydb) ;; *) die "unknown tool in TOOLS: $t" ;; esac
done
[[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl && -x $PGBIN/pgbench ]] ||
    die "no PostgreSQL 15 server binaries in $PGBIN (apt-get install -y postgresql-15)"
[[ -x /usr/bin/time ]] || die "GNU time missing (apt-get install -y time)"
command -v jq >/dev/null || die "jq missing (apt-get install -y jq)"
if [[ " $TOOLS " == *" kuaka "* ]]; then
    [[ -x $KUAKA_BIN ]] || die "no kuaka binary at $KUAKA_BIN (cargo build --release, or set KUAKA_BIN)"
fi

# The peer: skipped (with the reason in the report) if it cannot run here.
PEER_SKIP=""
PGCOPYDB_PLUGIN=()
if [[ " $TOOLS " == *" pgcopydb "* ]]; then
    if ! command -v pgcopydb >/dev/null; then
        PEER_SKIP="pgcopydb not installed (apt-get install -y pgcopydb postgresql-15-wal2json)"
    elif pgcopydb clone --help 2>&1 | grep -q -- '--plugin'; then
        PGCOPYDB_PLUGIN=(--plugin test_decoding)
    elif [[ ! -f $PGBIN/../lib/wal2json.so ]]; then
        PEER_SKIP="pgcopydb $(pgcopydb --version 2>/dev/null | awk '/^pgcopydb version/ { print $3 }') needs wal2json (apt-get install -y postgresql-15-wal2json)"
    fi
    [[ -z $PEER_SKIP ]] || log "skipping pgcopydb: $PEER_SKIP"
fi

# pgcopydb runs pg_dump/pg_restore: make sure it finds the 15 ones.
export PATH=$PGBIN:$PATH
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGAPPNAME

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
    BENCH_DIR=/tmp/kuaka-bench-cdc
    mkdir -p "$BENCH_DIR"
else
    BENCH_DIR=$(mktemp -d /tmp/kuaka-bench-cdc.XXXXXX)
    made_dir=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
PGDATA_DIR=$BENCH_DIR/data
SOCK_DIR=$BENCH_DIR/sock
WORK_DIR=$BENCH_DIR/work
LOG_DIR=$BENCH_DIR/logs
server_started=0
TIME_PID="" # /usr/bin/time running the tool
TOOL_PID="" # the tool itself (time's child)
MARKER_PID=""

# Pids of the processes below $1 (pgcopydb forks workers).
descendants() {
    local p
    for p in $(pgrep -P "$1" || true); do
        echo "$p"
        descendants "$p"
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -z $MARKER_PID ]] || kill "$MARKER_PID" 2>/dev/null
    if [[ -n $TOOL_PID ]] && kill -0 "$TOOL_PID" 2>/dev/null; then
        log "stopping the tool (pid $TOOL_PID)"
        local tree
        tree=$(descendants "$TOOL_PID")
        kill -TERM "$TOOL_PID" 2>/dev/null
        for _ in {1..100}; do
            kill -0 "$TOOL_PID" 2>/dev/null || break
            sleep 0.1
        done
        # shellcheck disable=SC2086 # a list of pids
        kill -KILL "$TOOL_PID" $tree 2>/dev/null
    fi
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

# --- kuaka bench/pg_cdc.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK_DIR'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
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

# Some PostgreSQL builds only allow the logical decoding output plugins listed in
# output_plugin_libraries (default 'pgoutput, test_decoding'); pgcopydb 0.10 needs wal2json.
if as_owner "$PGBIN/postgres" --describe-config 2>/dev/null | grep -q '^output_plugin_libraries' &&
    ! grep -q '^output_plugin_libraries' "$PGDATA_DIR/postgresql.conf"; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" |
        as_owner tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null
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

# ---------------------------------------------------------- source template --
# Built once (and kept with KEEP=1); each tool run gets a fresh copy as `src`.
tpl_marker="kuaka-bench-cdc pgbench scale=$SCALE + marker + ins"
have=$(q postgres "select shobj_description(oid, 'pg_database') from pg_database where datname = 'src_tpl'")
if [[ $have == "$tpl_marker" ]]; then
    log "reusing source template src_tpl ($tpl_marker)"
else
    log "building source template src_tpl: pgbench -i -s $SCALE, marker, ins"
    q postgres "drop database if exists src_tpl" >/dev/null
    q postgres "create database src_tpl template template0" >/dev/null
    "$PGBIN/pgbench" -i -q -s "$SCALE" -d "$(url src_tpl)" >"$LOG_DIR/pgbench-init.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
    # Every table needs a primary key for change streaming; pgbench_history has none.
    q src_tpl "alter table public.pgbench_history add column hid bigserial primary key;
               create table public.marker (id bigserial primary key,
                                           t timestamptz not null default clock_timestamp());
               create table public.ins (id bigint primary key, payload text)" >/dev/null
    q src_tpl "vacuum analyze" >/dev/null
    q postgres "comment on database src_tpl is '$tpl_marker'" >/dev/null
fi
SRC_ACCOUNTS=$(q src_tpl "select count(*) from public.pgbench_accounts")

# Drop src and dst with whatever a previous (failed) run left: sessions,
# slots, replication origins (those are cluster-wide).
reset_dbs() {
    local rc=0
    q postgres "select count(pg_terminate_backend(pid)) from pg_stat_activity
                where datname in ('src', 'dst') and pid <> pg_backend_pid()" >/dev/null || rc=1
    sleep 0.2
    q postgres "select count(pg_drop_replication_slot(slot_name)) from pg_replication_slots
                where database in ('src', 'dst')" >/dev/null || rc=1
    q postgres "drop database if exists src with (force)" >/dev/null || rc=1
    q postgres "drop database if exists dst with (force)" >/dev/null || rc=1
    q postgres "select count(pg_replication_origin_drop(roname)) from pg_replication_origin" >/dev/null || rc=1
    return $rc
}

# ------------------------------------------------------------------ helpers --
declare -A R # R[tool,key]

now() { printf '%s' "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# rate N SECONDS
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "-" }'; }

tool_alive() { [[ -n $TOOL_PID ]] && kill -0 "$TOOL_PID" 2>/dev/null; }

# wait_until TOOL WHAT TIMEOUT DB SQL: poll every 100 ms until SQL on DB returns t.
wait_until() {
    local tool=$1 what=$2 timeout=$3 db=$4 sql=$5 start=$EPOCHSECONDS
    until [[ $(q "$db" "$sql" 2>/dev/null) == t ]]; do
        if ! tool_alive; then
            R[$tool,why]="$tool exited while waiting for $what"
            return 1
        fi
        # pgcopydb goes on running after its transform or apply step failed.
        if [[ $tool == pgcopydb ]] && grep -q ' ERROR ' "$LOG_DIR/$tool.log"; then
            R[$tool,why]="pgcopydb logged an error while waiting for $what: $(grep -m 1 ' ERROR ' "$LOG_DIR/$tool.log" | cut -c 1-200)"
            return 1
        fi
        if ((EPOCHSECONDS - start >= timeout)); then
            R[$tool,why]="timed out after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# kuaka status --json value of a position (or the phase with "phase").
kuaka_status() {
    local state=$1 what=$2 json
    json=$("$KUAKA_BIN" status --state "$state" --json 2>/dev/null) || return 0
    if [[ $what == phase ]]; then
        jq -r '.phase // empty' <<<"$json"
    else
        jq -r --arg n "$what" '.positions[]? | select(.name == $n) | .value' <<<"$json"
    fi
}

# Markers: one psql running a DO loop that inserts and commits a row every
# MARKER_MS, until cancelled by stop_markers.
start_markers() {
    local sleep_s
    sleep_s=$(awk -v m="$MARKER_MS" 'BEGIN { printf "%.3f", m / 1000 }')
    PGAPPNAME=kuaka_bench_marker "$PGBIN/psql" -X -q -d "$(url src)" -c "do \$\$ begin
        loop
            insert into public.marker default values;
            commit;
            perform pg_sleep($sleep_s);
        end loop; end \$\$" >/dev/null 2>&1 &
    MARKER_PID=$!
    for _ in {1..100}; do
        [[ $(q postgres "select count(*) from pg_stat_activity where application_name = 'kuaka_bench_marker'") == 1 ]] && return 0
        sleep 0.1
    done
    log "the marker session did not start"
    return 1
}
stop_markers() {
    [[ -n $MARKER_PID ]] || return 0
    for _ in {1..50}; do
        q postgres "select count(pg_cancel_backend(pid)) from pg_stat_activity
                    where application_name = 'kuaka_bench_marker'" >/dev/null 2>&1 || true
        kill -0 "$MARKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$MARKER_PID" 2>/dev/null || true
    wait "$MARKER_PID" 2>/dev/null || true
    MARKER_PID=""
}

# On the target, once the tool created public.marker: stamp each marker's commit.
install_arrival_trigger() {
    q dst "create schema kuaka_bench;
           create table kuaka_bench.arrival (id bigint primary key,
                                             arrived timestamptz not null default clock_timestamp());
           create function kuaka_bench.arrived() returns trigger language plpgsql as
             \$\$ begin
                    insert into kuaka_bench.arrival (id) values (new.id) on conflict do nothing;
                    return null;
                  end \$\$;
           create constraint trigger kuaka_bench_arrival after insert or update on public.marker
             deferrable initially deferred for each row execute function kuaka_bench.arrived();
           alter table public.marker enable always trigger kuaka_bench_arrival" >/dev/null
}

# lag_stats TOOL PREFIX LO HI: lag of markers LO < id <= HI into R[TOOL,PREFIX_*].
lag_stats() {
    local tool=$1 p=$2 lo=$3 hi=$4 line
    line=$(q dst "select count(*),
                         coalesce(round(percentile_cont(0.5) within group (order by s)::numeric, 3)::text, '-'),
                         coalesce(round(percentile_cont(0.99) within group (order by s)::numeric, 3)::text, '-'),
                         coalesce(round(max(s)::numeric, 3)::text, '-')
                  from (select extract(epoch from a.arrived - m.t) as s
                        from public.marker m join kuaka_bench.arrival a using (id)
                        where m.id > $lo and m.id <= $hi) x")
    local timed p50 p99 max sent
    IFS='|' read -r timed p50 p99 max <<<"$line"
    sent=$(q src "select count(*) from public.marker where id > $lo and id <= $hi")
    R[$tool,${p}_p50]=$p50 R[$tool,${p}_p99]=$p99 R[$tool,${p}_max]=$max
    R[$tool,${p}_markers]="$timed/$sent"
}

# ----------------------------------------------------------------- the tools --
start_tool() {
    local tool=$1 tfile="$LOG_DIR/$1.time" tlog="$LOG_DIR/$1.log"
    case $tool in
        kuaka)
            local state="$WORK_DIR/kuaka-state"
            rm -rf "$state"
            local -a extra=(--apply-mode "$APPLY_MODE")
            [[ $APPLY_MODE == per-key ]] && extra+=(--apply-workers "$APPLY_WORKERS")
            local -a user=()
            [[ -n $KUAKA_ARGS ]] && read -ra user <<<"$KUAKA_ARGS"
            /usr/bin/time -v -o "$tfile" "$KUAKA_BIN" run --no-progress \
                --source "$(url src)" --target "$(url dst)" --state "$state" \
                "${extra[@]}" "${user[@]}" >"$tlog" 2>&1 &
            ;;
        pgcopydb)
            local pdir="$WORK_DIR/pgcopydb"
            rm -rf "$pdir"
            /usr/bin/time -v -o "$tfile" pgcopydb clone --follow \
                --source "$(url src)" --target "$(url dst)" --dir "$pdir" \
                --table-jobs 2 --index-jobs 2 --no-owner --no-acl \
                "${PGCOPYDB_PLUGIN[@]}" >"$tlog" 2>&1 &
            ;;
    esac
    TIME_PID=$!
    for _ in {1..100}; do
        TOOL_PID=$(pgrep -P "$TIME_PID" | head -n 1 || true)
        [[ -z $TOOL_PID ]] || return 0
        kill -0 "$TIME_PID" 2>/dev/null || break
        sleep 0.05
    done
    R[$tool,why]="$tool exited at once"
    return 1
}

# SIGTERM the tool, wait for it; exit code, stop time and peak RSS into R.
stop_tool() {
    local tool=$1 rc=0 t0
    [[ -n $TIME_PID ]] || return 0
    local tree
    tree=$(descendants "$TOOL_PID")
    tool_alive || R[$tool,stop_note]="had exited before SIGTERM"
    t0=$(now)
    kill -TERM "$TOOL_PID" 2>/dev/null || true
    for _ in {1..300}; do
        kill -0 "$TIME_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$TIME_PID" 2>/dev/null; then
        log "$tool did not stop within 30 s of SIGTERM; killing it"
        R[$tool,stop_note]="did not stop within 30 s of SIGTERM, killed"
        kill -KILL "$TOOL_PID" 2>/dev/null || true
    fi
    wait "$TIME_PID" 2>/dev/null || rc=$?
    # Workers that outlived their parent.
    local p
    for p in $tree; do
        if kill -0 "$p" 2>/dev/null; then
            R[$tool,stop_note]+="${R[$tool,stop_note]:+, }worker $p outlived it, killed"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    R[$tool,exit]=$rc
    R[$tool,stop_s]=$(secs "$t0" "$(now)")
    R[$tool,rss_mb]=$(awk -F': *' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$LOG_DIR/$tool.time" 2>/dev/null || true)
    TIME_PID="" TOOL_PID=""
}

clean_tool() {
    local tool=$1
    case $tool in
        kuaka)
            if ! "$KUAKA_BIN" clean --state "$WORK_DIR/kuaka-state" >"$LOG_DIR/kuaka-clean.log" 2>&1; then
                log "kuaka clean FAILED:"
                tail -n 10 "$LOG_DIR/kuaka-clean.log" >&2
                R[$tool,clean]=FAILED
            else
                R[$tool,clean]=ok
            fi
            ;;
        pgcopydb) ;; # reset_dbs drops its slot and origin
    esac
    local left
    left=$(q postgres "select count(*) from pg_replication_slots where database = 'src'")
    ((left == 0)) || log "$tool left $left replication slot(s) on src (dropped by the next reset)"
}

# ------------------------------------------------------------------- one run --
run_tool() {
    local tool=$1 t0 t1 t2 line
    log "=== $tool (log: $LOG_DIR/$tool.log)"
    reset_dbs || {
        R[$tool,why]="could not drop the previous src/dst"
        return 1
    }
    # (errexit does not act inside this function, called as a condition: check.)
    if ! q postgres "create database src template src_tpl" >/dev/null ||
        ! q postgres "create database dst template template0" >/dev/null; then
        R[$tool,why]="could not create src/dst"
        return 1
    fi
    q postgres "checkpoint" >/dev/null || true
    sync

    # Snapshot, then streaming.
    t0=$(now)
    start_tool "$tool" || return 1
    if [[ $tool == kuaka ]]; then
        local phase="" start=$EPOCHSECONDS
        until [[ $phase == streaming ]]; do
            tool_alive || {
                R[$tool,why]="kuaka exited before streaming"
                return 1
            }
            ((EPOCHSECONDS - start < WAIT_TIMEOUT)) || {
                R[$tool,why]="not streaming after ${WAIT_TIMEOUT}s (phase: ${phase:-none})"
                return 1
            }
            sleep 0.2
            phase=$(kuaka_status "$WORK_DIR/kuaka-state" phase)
        done
    else
        wait_until "$tool" "a replication slot on src" "$WAIT_TIMEOUT" postgres \
            "select exists (select 1 from pg_replication_slots where database = 'src')" || return 1
    fi
    # A row committed after the slot exists reaches the target only by streaming.
    q src "insert into public.ins values (0, 'probe')" >/dev/null || {
        R[$tool,why]="could not insert the probe row"
        return 1
    }
    wait_until "$tool" "the probe row on the target" "$WAIT_TIMEOUT" dst \
        "select exists (select 1 from public.ins where id = 0)" || return 1
    R[$tool,ready_s]=$(secs "$t0" "$(now)")
    log "$tool: streaming ${R[$tool,ready_s]} s after start"
    install_arrival_trigger || {
        R[$tool,why]="could not add the arrival trigger on the target"
        return 1
    }

    # W1: pgbench flat out, markers throughout.
    local m0 m1 m2 h0 h1 c0="" c1=""
    m0=$(q src "select coalesce(max(id), 0) from public.marker")
    h0=$(q src "select count(*) from public.pgbench_history")
    [[ $tool == kuaka ]] && c0=$(kuaka_status "$WORK_DIR/kuaka-state" applied_changes)
    start_markers || {
        R[$tool,why]="marker session did not start"
        return 1
    }
    log "$tool: W1 pgbench -c $CLIENTS -j 2 -T $DURATION"
    t1=$(now)
    "$PGBIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$DURATION" -d "$(url src)" >"$LOG_DIR/$tool.pgbench.log" 2>&1 || {
        R[$tool,why]="pgbench failed (see $LOG_DIR/$tool.pgbench.log)"
        return 1
    }
    t2=$(now)
    # W1's markers: those committed while pgbench ran. The marker session
    # goes on until W1 is on the target (so lag stays measured to the end),
    # but later markers count for neither workload.
    m1=$(q src "select coalesce(max(id), 0) from public.marker")
    h1=$(q src "select count(*) from public.pgbench_history")
    wait_until "$tool" "W1 on the target" "$WAIT_TIMEOUT" dst \
        "select (select count(*) from public.pgbench_history) = $h1
            and exists (select 1 from public.marker where id = $m1)" || return 1
    local t3
    t3=$(now)
    stop_markers
    R[$tool,tps]=$(awk '/^tps = / { printf "%.0f", $3; exit }' "$LOG_DIR/$tool.pgbench.log")
    local changes=$((4 * (h1 - h0) + $(q src "select count(*) from public.marker where id > $m0 and id <= $m1")))
    R[$tool,w1_changes]=$changes
    R[$tool,w1_rate]=$(rate "$changes" "$(secs "$t1" "$t3")")
    R[$tool,w1_drain]=$(secs "$t2" "$t3")
    if [[ $tool == kuaka ]]; then
        sleep 1.2 # kuaka writes its status once a second
        c1=$(kuaka_status "$WORK_DIR/kuaka-state" applied_changes)
        [[ -z $c0 || -z $c1 ]] || R[$tool,w1_counted]=$((c1 - c0))
    fi
    lag_stats "$tool" w1 "$m0" "$m1"
    log "$tool: W1 ${R[$tool,tps]} tps, $changes changes, ${R[$tool,w1_rate]} changes/s applied, drained ${R[$tool,w1_drain]} s after pgbench; lag p50 ${R[$tool,w1_p50]} p99 ${R[$tool,w1_p99]} max ${R[$tool,w1_max]} s"

    # W2: insert-only stream, markers throughout.
    local n=$((INSERT_ROWS / INSERT_BATCH)) first=1 last=$INSERT_ROWS mw
    start_markers || {
        R[$tool,why]="marker session did not start"
        return 1
    }
    log "$tool: W2 $INSERT_ROWS rows in $n transactions"
    mw=$(q src "select coalesce(max(id), 0) from public.marker")
    t0=$(now)
    awk -v n="$n" -v b="$INSERT_BATCH" 'BEGIN { for (i = 0; i < n; i++)
            printf "insert into public.ins select g, md5(g::text) from generate_series(%d, %d) g;\n", i * b + 1, (i + 1) * b }' |
        "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$(url src)" >"$LOG_DIR/$tool.inserts.log" 2>&1 || {
        R[$tool,why]="the inserts failed (see $LOG_DIR/$tool.inserts.log)"
        return 1
    }
    t1=$(now)
    wait_until "$tool" "the last inserted row on the target" "$WAIT_TIMEOUT" dst \
        "select exists (select 1 from public.ins where id = $last)" || return 1
    # In per-key mode rows may land out of order: also wait for all of them.
    wait_until "$tool" "all inserted rows on the target" "$WAIT_TIMEOUT" dst \
        "select count(*) = $INSERT_ROWS from public.ins where id between $first and $last" || return 1
    t2=$(now)
    m2=$(q src "select coalesce(max(id), 0) from public.marker")
    stop_markers
    local mend
    mend=$(q src "select coalesce(max(id), 0) from public.marker")
    wait_until "$tool" "the last markers on the target" "$WAIT_TIMEOUT" dst \
        "select exists (select 1 from public.marker where id = $mend)" || return 1
    R[$tool,w2_src_s]=$(secs "$t0" "$t1")
    R[$tool,w2_src_rate]=$(rate "$INSERT_ROWS" "${R[$tool,w2_src_s]}")
    R[$tool,w2_s]=$(secs "$t0" "$t2")
    R[$tool,w2_rate]=$(rate "$INSERT_ROWS" "${R[$tool,w2_s]}")
    lag_stats "$tool" w2 "$mw" "$m2"
    log "$tool: W2 inserted in ${R[$tool,w2_src_s]} s (${R[$tool,w2_src_rate]} rows/s) on the source, all on the target after ${R[$tool,w2_s]} s: ${R[$tool,w2_rate]} rows/s; lag p50 ${R[$tool,w2_p50]} p99 ${R[$tool,w2_p99]} max ${R[$tool,w2_max]} s"

    # Verify: the target holds what the source holds.
    local t verdict=ok sql
    for t in pgbench_accounts:abalance pgbench_tellers:tbalance pgbench_branches:bbalance \
        pgbench_history:delta ins:id marker:id; do
        sql="select count(*) || ' rows, sum ' || coalesce(sum(${t#*:}), 0) from public.${t%%:*}"
        local s d
        s=$(q src "$sql")
        d=$(q dst "$sql" 2>&1) || true
        if [[ $s != "$d" ]]; then
            log "$tool: MISMATCH in ${t%%:*}: source $s, target $d"
            verdict=MISMATCH
        fi
    done
    R[$tool,verify]=$verdict
    line=$(q dst "select count(*) from public.pgbench_accounts")
    R[$tool,accounts]="$line/$SRC_ACCOUNTS"
    return 0
}

# Other load (a compiler, a test suite) skews every number: sample the CPU for
# a second before each run (our own server is idle then) and say so.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }'
}
BUSY_SEEN=0
busy_check() {
    local pct others
    pct=$(cpu_busy_pct 2>/dev/null || echo 0)
    others=$(pgrep -x 'cargo|rustc' | wc -l || true)
    if ((others > 0 || pct > 35)); then
        log "WARNING: machine busy before this run (CPU ${pct}% busy, $others cargo/rustc processes): numbers will be noisy"
        BUSY_SEEN=1
    fi
}

# --------------------------------------------------------------------- main --
for tool in $TOOLS; do
    if [[ $tool == pgcopydb && -n $PEER_SKIP ]]; then
        R[$tool,status]="skipped: $PEER_SKIP"
        continue
    fi
    busy_check
    if run_tool "$tool"; then
        R[$tool,status]=ok
        [[ ${R[$tool,verify]} == ok ]] || R[$tool,status]="target MISMATCH"
    else
        R[$tool,status]="FAILED: ${R[$tool,why]:-?}"
        log "$tool FAILED: ${R[$tool,why]:-?}; last lines of its log:"
        tail -n 25 "$LOG_DIR/$tool.log" >&2 || true
    fi
    stop_markers
    stop_tool "$tool"
    log "$tool: exit status ${R[$tool,exit]:-?} after SIGTERM (stopped in ${R[$tool,stop_s]:-?} s), peak RSS ${R[$tool,rss_mb]:-?} MB"
    clean_tool "$tool"
done
reset_dbs || log "WARNING: could not drop src/dst at the end"

# ----------------------------------------------------------------- report --
v() { printf '%s' "${R[$1,$2]:-}"; }
ok() { [[ ${R[$1,status]:-} == ok ]]; }
# ratio KEY: kuaka/pgcopydb of a numeric result, when both have it.
ratio() {
    local a b
    a=$(v kuaka "$1") b=$(v pgcopydb "$1")
    if ok kuaka && ok pgcopydb && [[ $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]]; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
    else
        echo -
    fi
}
report() {
    local cols=() t
    for t in $TOOLS; do cols+=("$t"); done
    local peer=0
    [[ " $TOOLS " == *" kuaka "* && " $TOOLS " == *" pgcopydb "* ]] && ok kuaka && ok pgcopydb && peer=1
    echo
    echo "PostgreSQL -> PostgreSQL change streaming; ONE PG 15 cluster holds source and target, on one machine ($(nproc) cores)"
    echo "source: pgbench scale $SCALE ($SRC_ACCOUNTS pgbench_accounts); markers every $MARKER_MS ms"
    echo "W1: pgbench tpcb-like -c $CLIENTS -j 2 -T $DURATION; W2: $INSERT_ROWS rows in $((INSERT_ROWS / INSERT_BATCH)) INSERT transactions of $INSERT_BATCH"
    [[ " $TOOLS " != *" kuaka "* ]] || echo "kuaka: --apply-mode $APPLY_MODE$([[ $APPLY_MODE == per-key ]] && echo " --apply-workers $APPLY_WORKERS")${KUAKA_ARGS:+ $KUAKA_ARGS}"
    if [[ " $TOOLS " == *" pgcopydb "* ]]; then
        if [[ -n $PEER_SKIP ]]; then
            echo "pgcopydb: skipped ($PEER_SKIP)"
        else
            echo "pgcopydb: $(pgcopydb --version 2>/dev/null | awk '/^pgcopydb version/ { print $3 }'), clone --follow --table-jobs 2 --index-jobs 2 ${PGCOPYDB_PLUGIN[*]:-(wal2json)}"
        fi
    fi
    echo
    local fmt='%-34s'
    local hdr
    # shellcheck disable=SC2059
    hdr=$(printf "$fmt" "")
    for t in "${cols[@]}"; do hdr+=$(printf ' %12s' "$t"); done
    ((peer)) && hdr+=$(printf ' %15s' "kuaka/pgcopydb")
    echo "$hdr"
    row() { # label key [ratio]
        local line t
        # shellcheck disable=SC2059
        line=$(printf "$fmt" "$1")
        for t in "${cols[@]}"; do line+=$(printf ' %12s' "${R[$t,$2]:--}"); done
        ((peer)) && [[ ${3:-} == ratio ]] && line+=$(printf ' %15s' "$(ratio "$2")")
        echo "$line"
    }
    row "snapshot + start streaming (s)" ready_s
    row "W1 pgbench tps (source)" tps
    row "W1 row changes on the source" w1_changes
    row "W1 applied changes/s" w1_rate ratio
    row "W1 target done after pgbench (s)" w1_drain ratio
    row "W1 lag p50 (s)" w1_p50 ratio
    row "W1 lag p99 (s)" w1_p99 ratio
    row "W1 lag max (s)" w1_max ratio
    row "W1 markers timed / sent" w1_markers
    row "W1 kuaka applied_changes (status)" w1_counted
    row "W2 source insert time (s)" w2_src_s
    row "W2 source insert rows/s" w2_src_rate
    row "W2 all rows on target after (s)" w2_s ratio
    row "W2 applied rows/s" w2_rate ratio
    row "W2 lag p50 (s)" w2_p50 ratio
    row "W2 lag p99 (s)" w2_p99 ratio
    row "W2 lag max (s)" w2_max ratio
    row "W2 markers timed / sent" w2_markers
    row "peak RSS MB" rss_mb ratio
    row "exit status after SIGTERM" exit
    row "stop time after SIGTERM (s)" stop_s
    row "pgbench_accounts target/source" accounts
    for t in "${cols[@]}"; do
        printf '%-10s %s%s%s\n' "$t:" "${R[$t,status]}" \
            "${R[$t,stop_note]:+; ${R[$t,stop_note]}}" \
            "$([[ ${R[$t,clean]:-ok} == ok ]] || echo "; kuaka clean FAILED")"
    done
    echo "(markers timed / sent: markers with an arrival stamp / markers committed on the source)"
    ((!BUSY_SEEN)) || echo "WARNING: other load was running on this machine (see the log above); the numbers are noisy"
    if ((peer)); then
        echo "(kuaka/pgcopydb: above 1 is better for rates, below 1 is better for times, lags and RSS)"
    fi
    if [[ " $TOOLS " == *" kuaka "* ]]; then
        echo
        if ok kuaka; then
            local p99 r2 rss
            p99=$(v kuaka w1_p99) r2=$(v kuaka w2_rate) rss=$(v kuaka rss_mb)
            target_line() { # label value cond
                printf '  %-44s %-7s (%s)\n' "$1" "$(awk -v x="$2" "BEGIN { print ($3) ? \"met\" : \"MISSED\" }")" "$2"
            }
            echo "targets (kuaka):"
            target_line "lag p99 < 1 s while pgbench runs flat out" "$p99" "x < 1"
            target_line "insert stream applied at >= 50000 rows/s" "$r2" "x >= 50000"
            target_line "peak RSS < 200 MB" "$rss" "x < 200"
        else
            echo "targets (kuaka): not evaluated, kuaka ${R[kuaka,status]}"
        fi
    fi
}
report_text=$(report)
printf '%s\n' "$report_text"
if [[ -n $OUT ]]; then
    printf '%s\n' "$report_text" >"$OUT"
fi

# Non-zero exit if a tool that ran failed or its target differs, after printing everything.
for t in $TOOLS; do
    [[ ${R[$t,status]} == ok || ${R[$t,status]} == skipped:* ]] || exit 1
done
