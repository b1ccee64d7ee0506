# Conv VAE on MNIST with a choice of likelihood. On a fresh clone:
#   make train DATA=path/to/mnist     (trains DIST=bernoulli; make train DIST=beta, ...)
#   make test DATA=path/to/mnist     (make test-fast: the quick tier, on synthetic images)
#   make compare DATA=path/to/mnist   (every likelihood, then compare_likelihoods.py;
#                                      QUICK=1 for a first look, BUDGET=long to convergence,
#                                      SEEDS="0 1 2" for several)
#   make recipes DATA=path/to/mnist   (the densities under their other --fit recipes, beside their default)
#   make latent DATA=path/to/mnist    (a 2-D latent model of DIST, seed 0, and its two figures)
#   make latent-all DATA=...          (the same for every likelihood, and results/latent_all.png)
#   make bench DATA=path/to/mnist     (training and evaluation speed: results/bench.csv; make -B bench re-measures)
#   make compress DATA=path/to/mnist  (the test set coded losslessly by bits-back ANS with the best compare model)
# DATA is the directory holding MNIST/raw/ (downloaded there if missing and online).
# The first target that needs Python creates .venv from requirements.txt.

PYTHON ?= python3
DATA   ?= data
DIST   ?= bernoulli
LATENT ?= 32
SEED   ?= 0
EPOCHS ?= 20
PATIENCE ?= 0
OBJECTIVE ?= elbo
IW_SAMPLES ?= 5
FIT    ?=
TRAIN_FLAGS ?=
PLAN :=

VENV := .venv
PY   := $(VENV)/bin/python
IWAE := $(if $(filter iwae,$(OBJECTIVE)),iwae$(IW_SAMPLES)/)
FITS := discrete dequantised gray
RUN  := runs/$(IWAE)$(if $(FIT),$(FIT)/)$(DIST)-z$(LATENT)-s$(SEED)
CLASSIFIER := runs/classifier/model.pt

# make compare: every likelihood with the same latent dim, budget and seeds, in its own
# directory, then the comparison on the test set. The budget: at most COMPARE_EPOCHS epochs,
# stopping once the validation score (train.py: the 8-bit one; bernoulli's ELBO) has not improved
# for COMPARE_PATIENCE epochs. The default
# fits one sitting on a small CPU (README, Results); BUDGET=long trains to convergence, for a
# published table on a faster machine.
DISTS ?= bernoulli cbernoulli gaussian gaussian-shared gaussian-fixed beta categorical logistic logistic-mix
# make recipes: each density (dist:fit) under the --fit recipes other than its default, at the same
# budget, into $(COMPARE_DIR)/<fit>/, compared beside the density's make compare run
RECIPES ?= cbernoulli:dequantised cbernoulli:gray gaussian:dequantised gaussian:gray \
           gaussian-shared:dequantised gaussian-shared:gray gaussian-fixed:dequantised gaussian-fixed:gray \
           beta:dequantised beta:gray
$(foreach f,$(FIT) $(foreach r,$(RECIPES),$(word 2,$(subst :, ,$r))),$(if $(filter $(FITS),$f),,\
  $(error FIT $f: one of discrete, dequantised, gray)))
SEEDS ?= 0
ifdef QUICK
COMPARE_DIR    ?= runs/$(IWAE)quick
COMPARE_EPOCHS ?= 2
COMPARE_PATIENCE ?= 0
K       ?= 10
N_TEST  ?= 2000
N_CURVE ?= 100
RESULTS ?= results/$(IWAE)quick
else ifeq ($(BUDGET),long)
COMPARE_DIR    ?= runs/$(IWAE)long
COMPARE_EPOCHS ?= 200
COMPARE_PATIENCE ?= 10
RESULTS ?= results/$(IWAE)long
else
COMPARE_DIR    ?= runs/$(IWAE)compare
COMPARE_EPOCHS ?= 20
COMPARE_PATIENCE ?= 3
RESULTS ?= $(patsubst %/,%,results/$(IWAE))
endif
# the evaluation (QUICK sets its own above)
K       ?= 100
N_TEST  ?= 10000
N_CURVE ?= 1000
COMPARE_RUNS := $(foreach d,$(DISTS),$(foreach s,$(SEEDS),$(COMPARE_DIR)/$(d)-z$(LATENT)-s$(s)))
recipe_run = $(foreach s,$(SEEDS),$(COMPARE_DIR)/$(word 2,$(subst :, ,$1))/$(word 1,$(subst :, ,$1))-z$(LATENT)-s$(s))
RECIPE_RUNS := $(foreach d,$(sort $(foreach r,$(RECIPES),$(word 1,$(subst :, ,$r)))),$(foreach s,$(SEEDS),\
                 $(COMPARE_DIR)/$(d)-z$(LATENT)-s$(s))) $(foreach r,$(RECIPES),$(call recipe_run,$r))

.PHONY: help train test test-fast compare recipes classifier latent latent-all bench compress figures

help:   # the targets and the variables they take
	@echo 'make train    DATA=dir [DIST=bernoulli LATENT=32 SEED=0 EPOCHS=20 PATIENCE=0 TRAIN_FLAGS="--lr 3e-4"]'
	@echo '              [OBJECTIVE=iwae IW_SAMPLES=5]  (also for make compare: runs/iwae<K>/compare)'
	@echo '              trains runs/<DIST>-z<LATENT>-s<SEED>/ (runs/iwae<K>/... for IWAE; resumes an interrupted run)'
	@echo 'make test     DATA=dir              the tests (what CI runs)'
	@echo 'make test-fast                      the tests that need no MNIST, compiler or subprocess (synthetic images)'
	@echo 'make compare  DATA=dir [QUICK=1 | BUDGET=long] [SEEDS="0 1 2" DISTS="..." LATENT=32 K=100 N_TEST=10000 N_CURVE=1000]'
	@echo '              trains every likelihood (at most COMPARE_EPOCHS=20 epochs, COMPARE_PATIENCE=3;'
	@echo '              BUDGET=long: 200 and 10, into runs/long, results/long), then compare_likelihoods.py'
	@echo 'make recipes  DATA=dir [QUICK=1 | BUDGET=long]  the densities under every --fit recipe, at the'
	@echo '              compare budget: runs/compare/<fit>/ beside runs/compare/, results/recipes/'
	@echo 'make train FIT=gray|dequantised|discrete   a density under that recipe: runs/<fit>/<dist>-...'
	@echo 'make classifier DATA=dir           the judge of sample quality (runs/classifier/; make compare needs it)'
	@echo 'make latent   DATA=dir [DIST=bernoulli EPOCHS=20]   a 2-D latent model and its two figures'
	@echo 'make latent-all DATA=dir [DISTS="..."]             the same for every likelihood, side by side'
	@echo 'make bench    DATA=dir              training and evaluation speed: results/bench.csv'
	@echo 'make compress DATA=dir [COMPRESS_RUNS="..." COMPRESS_N=10000]  bits-back coding of the test set:'
	@echo '              results/compress.csv (default the best make compare run, categorical)'
	@echo 'make figures  [QUICK=1]             copies the README figures from results/ (results/quick/) into docs/figures/'
	@echo 'DATA holds MNIST/raw/ (downloaded there if missing and online); the first target creates .venv.'

train: $(RUN)/model.pt

compare: | $(VENV)/.installed
	@start=$$(date +%s); $(MAKE) --no-print-directory $(RESULTS)/likelihoods.csv && \
	echo "make compare$(if $(QUICK), QUICK=1,)$(if $(BUDGET), BUDGET=$(BUDGET),): at most $(COMPARE_EPOCHS) epochs (patience $(COMPARE_PATIENCE)), seeds $(SEEDS), k = $(K) on $(N_TEST) test images; total wall time $$(( $$(date +%s) - start )) s"

$(addsuffix /model.pt,$(COMPARE_RUNS) $(RECIPE_RUNS)): EPOCHS = $(COMPARE_EPOCHS)
$(addsuffix /model.pt,$(COMPARE_RUNS) $(RECIPE_RUNS)): PATIENCE = $(COMPARE_PATIENCE)
# the first run prints an estimate of the whole comparison's time after its first epoch
$(firstword $(COMPARE_RUNS))/model.pt: PLAN = --compare-plan $(words $(COMPARE_RUNS)) $(K) $(N_TEST) $(N_CURVE)

$(RESULTS)/likelihoods.csv: compare_likelihoods.py quality.py $(addsuffix /model.pt,$(COMPARE_RUNS)) $(CLASSIFIER) | $(VENV)/.installed
	$(PY) compare_likelihoods.py $(COMPARE_RUNS) --data-dir $(DATA) --out $(RESULTS) \
	  --k $(K) --n-test $(N_TEST) --n-curve $(N_CURVE) --classifier $(CLASSIFIER)

recipes: | $(VENV)/.installed
	@start=$$(date +%s); $(MAKE) --no-print-directory $(RESULTS)/recipes/likelihoods.csv && \
	echo "make recipes$(if $(QUICK), QUICK=1,)$(if $(BUDGET), BUDGET=$(BUDGET),): total wall time $$(( $$(date +%s) - start )) s"

$(RESULTS)/recipes/likelihoods.csv: compare_likelihoods.py quality.py $(addsuffix /model.pt,$(RECIPE_RUNS)) $(CLASSIFIER) | $(VENV)/.installed
	$(PY) compare_likelihoods.py $(RECIPE_RUNS) --data-dir $(DATA) --out $(RESULTS)/recipes \
	  --k $(K) --n-test $(N_TEST) --n-curve $(N_CURVE) --classifier $(CLASSIFIER)

# make classifier: the judge of sample quality (quality.py), trained once and kept; an
# interrupted one resumes. Order-only: a change of quality.py does not retrain it.
classifier: $(CLASSIFIER)

$(CLASSIFIER): | $(VENV)/.installed
	$(PY) quality.py --data-dir $(DATA) --out-dir $(dir $@)

# make latent: results/latent_<dist>.png and results/manifold_<dist>.png of runs/<dist>-z2-s0,
# trained first if missing; make latent-all: those for every likelihood, and all side by side.
latent: results/latent_$(DIST).png

latent-all: results/latent_all.png $(foreach d,$(DISTS),results/latent_$(d).png)

results/latent_%.png results/manifold_%.png: runs/%-z2-s0/model.pt plot_latent.py vae.py distributions.py | $(VENV)/.installed
	$(PY) plot_latent.py --ckpt $< --data-dir $(DATA) --out results

results/latent_all.png: plot_latent.py vae.py distributions.py $(foreach d,$(DISTS),runs/$(d)-z2-s0/model.pt) | $(VENV)/.installed
	$(PY) plot_latent.py --ckpt $(filter %.pt,$^) --data-dir $(DATA) --all $@

# make figures: the README's figures, copied from $(RESULTS)/ (make compare's, QUICK=1: results/quick/)
# and results/ (make latent-all's); it never trains: run those first. docs/figures/ is the one
# committed output.
FIGURES := $(addprefix $(RESULTS)/,likelihoods.png quality.png samples.png reconstructions.png learning_curves.png) \
           $(addprefix results/,latent_all.png latent_bernoulli.png manifold_bernoulli.png)
figures:
	@mkdir -p docs/figures
	@for f in $(FIGURES); do if [ -f $$f ]; then cp $$f docs/figures/ && echo "docs/figures/$$(basename $$f) from $$f"; \
	  else echo "$$f is missing (make compare / make latent-all draw it): not updated" >&2; fi; done

# make bench: images/s of train.py's loop against the compute ceiling, and of the evaluation.
bench: results/bench.csv

results/bench.csv: bench.py train.py vae.py distributions.py rundir.py utils.py | $(VENV)/.installed
	$(PY) bench.py --data-dir $(DATA) --out $@

# make compress: the first COMPRESS_N test images coded losslessly by bits-back ANS (compress.py) with
# each of COMPRESS_RUNS (default make compare's best, categorical; trained first if missing), checked
# bit for bit: results/compress/<run>.bbans and a row each in results/compress.csv.
COMPRESS_RUNS ?= $(COMPARE_DIR)/categorical-z$(LATENT)-s0
COMPRESS_N ?= 10000
compress: $(addsuffix /model.pt,$(COMPRESS_RUNS)) | $(VENV)/.installed
	@for r in $(COMPRESS_RUNS); do $(PY) compress.py $$r --n $(COMPRESS_N) --data-dir $(DATA) || exit 1; done

test: | $(VENV)/.installed
	MNIST_DATA=$(DATA) $(PY) -m pytest -q test_vae.py test_runs.py

test-fast: | $(VENV)/.installed
	$(PY) -m pytest -q -m 'not slow' test_vae.py

# Rebuilt when requirements.txt changes; order-only below, so that never retrains a model.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# runs/[iwae<K>/][group/][<fit>/]<dist>-z<latent>-s<seed>/model.pt: the directory name gives the flags
# (iwae<K>: --objective iwae --iw-samples K; <fit>, one of discrete, dequantised, gray: --fit <fit>). Split from the right, since a dist name may contain
# '-' (gaussian-fixed). EPOCHS and TRAIN_FLAGS are not in the name: changing them does not
# retrain an existing run.
run_iw     = $(patsubst iwae%,%,$(filter iwae%,$(firstword $(subst /, ,$1))))
run_fit    = $(filter $(FITS),$(subst /, ,$(patsubst %/,%,$(dir $1))))
run_seed   = $(patsubst s%,%,$(lastword $(subst -, ,$1)))
run_latent = $(patsubst z%,%,$(lastword $(subst -, ,$(patsubst %-s$(call run_seed,$1),%,$1))))
run_dist   = $(patsubst %-z$(call run_latent,$1)-s$(call run_seed,$1),%,$1)

# A model reached only through a chain of pattern rules (make latent) would count as an
# intermediate file, which make deletes when it is done; .PRECIOUS keeps every model.
.PRECIOUS: runs/%/model.pt
# A run with last.pt but no model.pt was interrupted: it is resumed. A model.pt older than the
# code is trained again from the start (--overwrite: train.py refuses to replace a run otherwise).
runs/%/model.pt: train.py vae.py distributions.py rundir.py | $(VENV)/.installed
	$(PY) train.py --dist $(call run_dist,$(notdir $*)) --latent-dim $(call run_latent,$(notdir $*)) \
	  --seed $(call run_seed,$(notdir $*)) --epochs $(EPOCHS) --patience $(PATIENCE) --data-dir $(DATA) --out-dir $(@D) \
	  $(if $(call run_iw,$*),--objective iwae --iw-samples $(call run_iw,$*)) $(if $(call run_fit,$*),--fit $(call run_fit,$*)) \
	  $(PLAN) $(TRAIN_FLAGS) \
	  $(if $(wildcard $@),--overwrite,$(if $(wildcard $(@D)/last.pt),--resume))
