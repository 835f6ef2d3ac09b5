.PHONY: check test it bench quickstart

check:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test:
	./scripts/test.sh

it:
	cargo test --test it

bench:
	bench/pg_snapshot.sh

quickstart:
	./scripts/quickstart.sh
