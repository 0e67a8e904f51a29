# Thin driver over CMake. The two commands of README.md:
#   make demo   installs dependencies, builds, runs the main job (kvstored
#               on its RocksDB data dir, driven by the real-model decoder)
#   make test   installs dependencies, builds, runs every test
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps build demo test lint asan tsan bench clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVS_WERROR=ON $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@bash scripts/demo-main.sh $(BUILD)

test: build lint
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 300
	@$(MAKE) --no-print-directory asan
	@$(MAKE) --no-print-directory tsan

# The layer rules of DESIGN.md on the sources (scripts/check-layers.py) and
# the committed .clang-format (scripts/check-format.sh).
lint: deps
	@python3 scripts/check-layers.py
	@bash scripts/check-format.sh

# Sanitizer builds run the unit tests again (ASan+UBSan in one build, TSan in another).
# They build segments with the sample k-means (KVS_KMEANS=sample, the same
# code on a quarter of the keys): the default full k-means made TSan's
# test_engine 345 s instead of 108 s, and which clustering the segments get
# is no concern of a sanitizer (the plain run above tests the default).
asan: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVS_ASAN=ON -DKVS_UBSAN=ON -DKVS_CUDA=OFF -DKVS_WERROR=ON -DKVS_SANITIZER_RUN=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && KVS_KMEANS=sample ctest --output-on-failure -j $(JOBS) --timeout 600 -L 'unit|adversarial'

tsan: deps
	@cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVS_TSAN=ON -DKVS_CUDA=OFF -DKVS_WERROR=ON -DKVS_SANITIZER_RUN=ON >/dev/null
	@cmake --build build-tsan -j $(JOBS)
	@cd build-tsan && KVS_KMEANS=sample TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp" ctest --output-on-failure -j $(JOBS) --timeout 600 -L tsan

clean:
	rm -rf $(BUILD) build-asan build-tsan
