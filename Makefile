VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean debian-deps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/speedsync demo

# Debian packages the tests need (iproute2: the shaped-link tests' ip and tc; prometheus: the metrics
# test's real server, which runs its own instance), installed where missing when run as root (as CI is);
# elsewhere a note, and those tests skip naming the reason.
debian-deps:
	@missing=$$(for p in $$(cat tests/requirements-debian.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "not installed: $$missing (the tests that need it will skip)"; fi

test: $(STAMP) debian-deps
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/replicate.py

clean:
	rm -rf $(VENV) var build *.egg-info
