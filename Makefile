# Conv VAE on MNIST with a choice of likelihood. On a fresh clone:
#   make train DATA=path/to/mnist     (trains DIST=bernoulli; make train DIST=beta, ...)
#   make test DATA=path/to/mnist
# DATA is the directory holding MNIST/raw/ (downloaded there if missing and online).
# The first target that needs Python creates .venv from requirements.txt.

PYTHON ?= python3
DATA   ?= data
DIST   ?= bernoulli
LATENT ?= 32
SEED   ?= 0
EPOCHS ?= 20
TRAIN_FLAGS ?=

VENV := .venv
PY   := $(VENV)/bin/python
RUN  := runs/$(DIST)-z$(LATENT)-s$(SEED)

.PHONY: train test

train: $(RUN)/model.pt

test: | $(VENV)/.installed
	MNIST_DATA=$(DATA) $(PY) -m pytest -q test_vae.py

# Rebuilt when requirements.txt changes; order-only below, so that never retrains a model.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# runs/<dist>-z<latent>-s<seed>/model.pt: the directory name gives the flags. Split from
# the right, since a dist name may contain '-' (gaussian-fixed). EPOCHS and TRAIN_FLAGS
# are not in the name: changing them does not retrain an existing run.
run_seed   = $(patsubst s%,%,$(lastword $(subst -, ,$1)))
run_latent = $(patsubst z%,%,$(lastword $(subst -, ,$(patsubst %-s$(call run_seed,$1),%,$1))))
run_dist   = $(patsubst %-z$(call run_latent,$1)-s$(call run_seed,$1),%,$1)

runs/%/model.pt: train.py vae.py | $(VENV)/.installed
	$(PY) train.py --dist $(call run_dist,$*) --latent-dim $(call run_latent,$*) \
	  --seed $(call run_seed,$*) --epochs $(EPOCHS) --data-dir $(DATA) --out-dir $(@D) $(TRAIN_FLAGS)
