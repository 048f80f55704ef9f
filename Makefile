# Shortcuts for the commands in the README; each is one line you can also run by hand.
.PHONY: help install format lint test test-fast

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## Create .venv with seg-train and its dev extras.
	bash scripts/install.sh dev

format:  ## Apply ruff's fixes and formatting.
	bash scripts/lint.sh --fix

lint:  ## What CI enforces: ruff check, ruff format --check, shellcheck.
	bash scripts/lint.sh

test:  ## The whole test suite (the README's test command).
	bash scripts/test.sh

test-fast:  ## The suite without the slow end-to-end runs.
	bash scripts/test.sh -m "not slow"
