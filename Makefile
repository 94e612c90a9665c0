# Convenience entry points; the scripts they call are the real interface.
PYTHON ?= python3
FUZZ_SECONDS ?= 60
FUZZ_JOBS ?= 1

.PHONY: fuzz fuzz-smoke outside-suites

# Every fuzz target for FUZZ_SECONDS each (fuzz/run.py --help; TARGETS="request session" to pick).
fuzz:
	$(PYTHON) fuzz/run.py --seconds $(FUZZ_SECONDS) --jobs $(FUZZ_JOBS) $(TARGETS)

fuzz-smoke:
	$(PYTHON) fuzz/run.py --seconds 3 --jobs 2 --fresh-corpus

# stress-ng --verify stressors and fio verify=crc32c on our /dev/fuse mounts and a plain directory.
outside-suites:
	$(PYTHON) benchmarks/outside_suites.py
