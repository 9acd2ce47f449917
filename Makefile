# The README's two commands: `make run` and `make test`. Each installs what it needs first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
# Label Studio (the review round-trip test's server) pins Django and much else that clash with
# mlpipe's own dependencies: it gets a venv of its own, and the test runs its `label-studio`.
LABEL_STUDIO_VERSION := 1.23.2
LS_VENV  := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install run test system-packages

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements.lock
# presidio-image-redactor (mlpipe.burned_in) without its declared deps: it asks for opencv-python, which would
# overwrite the cv2 files of albumentations' opencv-python-headless; what its import needs is in requirements.lock.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps presidio-image-redactor==0.0.62
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/mlpipe run $(ARGS)

# The three installs are independent (mostly download and unpack time): side by side.
test:
	$(MAKE) --no-print-directory -j3 $(STAMP) $(LS_STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(LS_STAMP):
	rm -rf $(LS_VENV) && $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir label-studio==$(LABEL_STUDIO_VERSION)
	touch $@

# Debian's PostgreSQL (the integration tests' MLflow server), Chromium (the Prefect UI test),
# Fashion-MNIST (the real-data flow test and the model-quality benchmark) and tesseract-ocr with its
# English data (the burned-in text OCR, mlpipe.burned_in), if missing.
system-packages:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v tesseract >/dev/null 2>&1 || missing="$$missing tesseract-ocr"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian's$$missing for the tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
