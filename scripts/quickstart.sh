#!/usr/bin/env bash
# Copies the pagila sample database between two databases of a local PostgreSQL with kuaka.
# Uses the server at $PGHOST:$PGPORT (default 127.0.0.1:5432) as $PGUSER (default postgres);
# creates (and first drops) the databases kuaka_quickstart_src and kuaka_quickstart_dst.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
PAGILA="${PAGILA:-../shared/datasets/pagila}"
src=kuaka_quickstart_src dst=kuaka_quickstart_dst

cargo build --release --quiet
for db in "$src" "$dst"; do
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
done
echo "loading pagila into $src ..."
psql -X -q -d "$src" -v ON_ERROR_STOP=0 -f "$PAGILA/pagila-schema.sql" >/dev/null 2>&1
gzip -dc "$PAGILA/pagila-data.sql.gz" | psql -X -q -d "$src" >/dev/null 2>&1

state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
./target/release/kuaka run --snapshot-only \
    --source "postgres://$PGUSER@$PGHOST:$PGPORT/$src" \
    --target "postgres://$PGUSER@$PGHOST:$PGPORT/$dst" \
    --state "$state"
./target/release/kuaka status --state "$state"

echo
echo "row counts, source vs target:"
for t in actor film rental payment customer inventory; do
    a=$(psql -X -At -d "$src" -c "SELECT count(*) FROM public.$t")
    b=$(psql -X -At -d "$dst" -c "SELECT count(*) FROM public.$t")
    printf '  %-10s %8s %8s %s\n' "$t" "$a" "$b" "$([ "$a" = "$b" ] && echo ok || echo DIFFERENT)"
done
