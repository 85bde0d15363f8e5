# The README's two commands: `make reproduce` and `make test`. Both create the environment when needed
# and reuse it afterwards (the stamp file depends on requirements.txt and pyproject.toml).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1
# DVC stage commands call `python`: it must be this environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: screenshots env reproduce test ui clean-data

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing pinned dependencies into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import torch, ray, mlflow, dvc, decord, librosa, cv2, av, mmrobust"
	@# librosa compiles its numba kernels on first use (~30 s of CPU, in every process until cached): cache them now
	@$(PY) -c "import librosa, numpy; librosa.feature.melspectrogram(y=numpy.zeros(4000, numpy.float32), sr=16000)"
	@touch $@

# One local Ray head serves every stage (pipelines/local_cluster.py); RAY_ADDRESS set = use that cluster.
reproduce: $(STAMP)
	$(PY) -m pipelines.local_cluster -- dvc repro
	@echo ">> results: results/README.md (T1 across datasets; links to each dataset's tables and figures), models/<dataset>/, MLflow runs in mlflow.db (make ui)"

ui: $(STAMP)
	@echo ">> runs: $$($(PY) -c "from mmrobust.config import load_params; from mmrobust.tracking import runs_url; t = load_params().tracking; print(runs_url('sqlite:///mlflow.db', t.experiment))")"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# the runs page, the models and a JT-vs-CRMT comparison as a user sees them (needs: apt-get install chromium)
screenshots: $(STAMP)
	$(PY) scripts/mlflow_screenshots.py --store sqlite:///mlflow.db --out results/screenshots

test: $(STAMP)
	$(PY) -m pytest tests

clean-data:
	rm -rf data/synthetic data/manifest data/features plan models tune results .cache ray_results
