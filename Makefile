# The two commands of the README. Both build .venv from pyproject.toml first (again when it changes).
VENV := .venv
PY := $(VENV)/bin/python
# Real images for the demo and the tests: Fashion-MNIST (70,000 labelled 28x28 images). First choice,
# Debian's package (installed with apt-get as root or with sudo); where it is absent and apt-get is out of
# reach, Zalando's files downloaded into data/fashion-mnist, sha256 checked. The targets that need it run
# with LTRP_FASHION_MNIST naming its folder; set it yourself to use another one (make then installs nothing).
DEBIAN_FASHION_MNIST := /usr/share/datasets/fashion-mnist
DOWNLOADED_FASHION_MNIST := $(CURDIR)/data/fashion-mnist
APT_GET := $(shell command -v apt-get >/dev/null && \
	if [ "$$(id -u)" -eq 0 ]; then echo apt-get; elif command -v sudo >/dev/null; then echo sudo apt-get; fi)
ifdef LTRP_FASHION_MNIST
FASHION_MNIST := $(LTRP_FASHION_MNIST)
FASHION_MNIST_READY :=
else ifneq ($(wildcard $(DEBIAN_FASHION_MNIST))$(APT_GET),)
FASHION_MNIST := $(DEBIAN_FASHION_MNIST)
FASHION_MNIST_READY := $(DEBIAN_FASHION_MNIST)
else
FASHION_MNIST := $(DOWNLOADED_FASHION_MNIST)
FASHION_MNIST_READY := $(DOWNLOADED_FASHION_MNIST)/.fetched
endif
export LTRP_FASHION_MNIST := $(FASHION_MNIST)

# The cluster image: one immutable tag per commit, so a node never runs older code under a reused tag.
IMAGE := ghcr.io/ltrp/ltrp:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)-$(shell git rev-parse --short=12 HEAD)

# Natural photographs for judge pre-training (issue 28): the photographs among Debian's MATE and KDE
# Plasma wallpapers (installed offline; each package's copyright file gives its licence), fetched with
# apt-get download and unpacked here, no root: `python -m jobs.scenes --photos data/photos ...`.
PHOTOS := data/photos
MATE_PHOTOS := Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood YellowFlower
PLASMA_PHOTOS := BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite MilkyWay \
	OneStandsOut Path Volna summer_1am

.PHONY: demo test test-quick test-faults test-docs pin image photos fashion-mnist

# Every package at the version and hash of requirements/dev.lock: what CI tests is what the cluster
# images install (requirements/worker.lock and head.lock: the same versions, fewer packages).
$(VENV)/.installed: pyproject.toml requirements/dev.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

fashion-mnist: $(FASHION_MNIST_READY)

$(DEBIAN_FASHION_MNIST):
	$(APT_GET) update -qq
	$(APT_GET) install -y -qq dataset-fashion-mnist

$(DOWNLOADED_FASHION_MNIST)/.fetched: $(VENV)/.installed
	$(PY) -m ltrp.data.datasets $(@D)
	touch $@

photos: $(PHOTOS)/.fetched

$(PHOTOS)/.fetched:
	rm -rf $(PHOTOS) && mkdir -p $(PHOTOS)/debs
	cd $(PHOTOS)/debs && apt-get download -qq mate-backgrounds plasma-workspace-wallpapers
	for deb in $(PHOTOS)/debs/*.deb; do dpkg-deb -x $$deb $(PHOTOS)/debs/root; done
	for name in $(MATE_PHOTOS); do cp $(PHOTOS)/debs/root/usr/share/backgrounds/mate/nature/$$name.jpg $(PHOTOS)/; done
	for name in $(PLASMA_PHOTOS); do \
		largest=$$(ls -S $(PHOTOS)/debs/root/usr/share/wallpapers/$$name/contents/images/* | head -1); \
		cp "$$largest" $(PHOTOS)/$$name.$${largest##*.}; done
	rm -rf $(PHOTOS)/debs
	touch $@

demo: $(VENV)/.installed fashion-mnist
	$(PY) -m jobs.pipeline

test: $(VENV)/.installed fashion-mnist
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not gpu and not faults and not docs" --durations=15 -n 2 --dist loadfile

# While working: `make test` without the tests marked slow (each more than a few seconds on a 2-core
# CPU: real jobs, Ray clusters, trainings), for a check in minutes; `make test` before a commit.
test-quick: $(VENV)/.installed fashion-mnist
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not slow and not gpu and not faults and not docs" --durations=15 -n 2 --dist loadfile

# The long fault runs: scoring and ranking jobs killed and re-run, a DDP training relaunched and
# resumed, the multi-node cluster with token authentication losing its worker node mid-scoring and
# mid-training, and training and evaluation through S3 and MLflow faults. CI runs them after `make test`.
test-faults: $(VENV)/.installed fashion-mnist
	$(PY) -m pytest -m "faults and not gpu" --durations=5 -n 2 --dist loadfile

# Every command and code block of README.md and docs/*.md, run as written against a tiny pipeline run
# (tests/test_docs.py; the blocks marked check-only are checked for syntax and flags in `make test`).
test-docs: $(VENV)/.installed fashion-mnist
	$(PY) -m pytest -m "docs and not gpu" --durations=5 tests/test_docs.py

# After a dependency change in pyproject.toml: re-lock with pip-tools (in a venv of its own), keeping
# every locked version that still fits; `make pin PIN_ARGS=--upgrade` moves to the newest. The worker
# and head locks start from the dev lock, so the three agree on every version they share.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make pin" .pin/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(PIN_ARGS)
pin:
	test -x .pin/bin/pip-compile || { python3 -m venv .pin && .pin/bin/pip install --quiet pip-tools==7.4.1; }
	$(PIP_COMPILE) --extra full --extra dev -o requirements/dev.lock pyproject.toml
	cp requirements/dev.lock requirements/worker.lock && $(PIP_COMPILE) -o requirements/worker.lock pyproject.toml
	cp requirements/dev.lock requirements/head.lock
	$(PIP_COMPILE) --extra full --extra cluster -o requirements/head.lock pyproject.toml

# Build and push the cluster images of this commit, the head's and (tag suffix -worker) the workers';
# the tags name the commit, so commit first.
image:
	git diff --quiet HEAD || { echo "make image: uncommitted changes; the tag $(IMAGE) names HEAD" >&2; exit 1; }
	docker build -f cluster/Dockerfile --build-arg LOCK=head -t $(IMAGE) .
	docker build -f cluster/Dockerfile --build-arg LOCK=worker -t $(IMAGE)-worker .
	docker push $(IMAGE) && docker push $(IMAGE)-worker
	@echo "export LTRP_IMAGE=$(IMAGE)"
