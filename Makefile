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

# Two phases: the tests marked serial measure rates or latencies on this machine (the shaped link,
# fairness, the STORED timing), so they run alone after the rest, which runs on TEST_WORKERS workers
# (three on two cores: most of a test's time is spent waiting on its processes).
TEST_WORKERS ?= 3
test: $(STAMP) debian-deps
	@rc=0; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not serial" || rc=1; \
	$(PY) -m pytest -q -m serial || rc=1; \
	exit $$rc

bench: $(STAMP)
	$(PY) bench/replicate.py

clean:
	rm -rf $(VENV) var build *.egg-info
