# The README's two commands live here so that CI runs exactly what a newcomer runs.
.PHONY: setup demo test lint dev

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/x402c demo

dev: setup
	@.venv/bin/x402c dev

test: setup
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy connector
