# Transfer learning done right. `make help` lists every target and setting.
# Settings are Makefile variables: make features DATA=photos WEIGHTS=/path/to/notop.h5

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-stamp

DATA      ?= data
ARTIFACTS ?= artifacts
BACKBONE  ?= vgg16
WEIGHTS   ?= imagenet
SIZE      ?=
LAYER     ?=
BATCH     ?= 32
DTYPE     ?= float16
PRECISION ?= auto
AUGMENT   ?= 0
REBUILD   ?= 0
VERIFY    ?= 0
MAPS      ?= 1
CLUSTER   ?=
VIEWS     ?= 0
HEAD      ?= logreg
POOL      ?=
FOLDS     ?=
REPEATS   ?=
BUDGET    ?=
RACE      ?= 1
SEED      ?= 0
GROUPS    ?= content
PARAMS    ?=
IMAGES    ?=
RUN       ?=
OUT       ?=
TOPK      ?=
FORMAT    ?= npz
SWEEP_HEADS ?= logreg,svm,dense
SWEEP_POOLS ?= avg,max,flatten
SWEEP_VIEWS ?= 0
SWEEP_BACKBONES ?=
GALLERY   ?=
VERBOSE   ?= 0

# VERBOSE=1: TensorFlow's own start-up and C++ lines are shown (pipeline/progress.py)
export PIPELINE_VERBOSE := $(VERBOSE)

comma := ,
# A path setting as one shell word, exactly as typed: single-quoted for the shell (a ' inside
# becomes '"'"'), read with $(value) so a `$` in it is kept, not expanded by make. Spaces,
# quotes, $, backslashes, commas and non-ASCII letters all pass (tests/test_make_paths.py).
q = '$(subst ','"'"',$(value $(1)))'
pool_arg   = $(if $(POOL),--pool $(POOL))
param_args = $(foreach p,$(PARAMS),--param $(p))
run_arg    = $(if $(RUN),--run $(RUN))
out_arg    = $(if $(value OUT),--out $(call q,OUT))
tta_arg    = $(if $(TTA),--tta $(TTA))
size_arg   = $(if $(SIZE),--size $(SIZE))
layer_arg  = $(if $(LAYER),--layer $(LAYER))
cluster_arg = $(if $(CLUSTER),--cluster $(CLUSTER))
topk_arg   = $(if $(TOPK),--topk $(TOPK))
repeats_arg = $(if $(REPEATS),--repeats $(REPEATS))$(if $(BUDGET), --budget $(BUDGET))
race_arg   = $(if $(filter 0,$(RACE)),--no-race)
folds_arg  = $(if $(FOLDS),--folds $(FOLDS))

# Settings a target does not use are refused: `make predict HEAD=logreg` stops with one line
# (exit status 2) instead of running the best run. takes.<target> lists what each target uses
# (tests/test_library.py checks the lists against the recipes, tests/test_settings.py against
# the settings in pipeline/settings.py); PYTHON, VENV and VERBOSE are every target's. Any
# other setting given on the command line, a misspelt one too, stops make.
takes.help       :=
takes.install    :=
takes.features   := DATA ARTIFACTS BACKBONE WEIGHTS SIZE LAYER BATCH DTYPE PRECISION SEED AUGMENT REBUILD VERIFY MAPS CLUSTER
takes.train-head := HEAD POOL FOLDS REPEATS BUDGET SEED VIEWS PARAMS CLUSTER ARTIFACTS GROUPS
takes.train-all  := POOL FOLDS REPEATS BUDGET SEED VIEWS PARAMS CLUSTER ARTIFACTS GROUPS
takes.finetune   := DATA ARTIFACTS BACKBONE WEIGHTS SIZE BATCH DTYPE PRECISION SEED FOLDS REPEATS BUDGET PARAMS CLUSTER
takes.sweep       = ARTIFACTS FOLDS REPEATS BUDGET RACE SEED SWEEP_HEADS SWEEP_POOLS SWEEP_VIEWS SWEEP_BACKBONES CLUSTER $(if $(SWEEP_BACKBONES),DATA WEIGHTS SIZE PRECISION)
takes.report     := ARTIFACTS GALLERY
takes.audit      := ARTIFACTS RUN SEED
takes.predict    := IMAGES RUN OUT TTA TOPK WEIGHTS BACKBONE ARTIFACTS CLUSTER
takes.export     := ARTIFACTS FORMAT POOL OUT
takes.demo       := ARTIFACTS WEIGHTS
takes.test       :=
takes.lint       :=
takes.bench      := ARTIFACTS BENCH_SIZE BENCH_ONLY PRECISION
takes.bench-gpu  := ARTIFACTS BENCH_SIZE
takes.clean      := ARTIFACTS
everyones_settings := PYTHON VENV VERBOSE
hint.predict.HEAD := ; pick a run with RUN=<name> (make report lists them)
hint.predict.POOL := ; pick a run with RUN=<name> (make report lists them)
hint.train-all.HEAD := ; it trains logreg, svm and dense (make train-head HEAD=... for one)
$(foreach v,DATA WEIGHTS SIZE PRECISION,$(eval hint.sweep.$(v) := ; $(v) goes with SWEEP_BACKBONES (each backbone extracted from DATA)))
hint.sweep.HEAD := ; SWEEP_HEADS=logreg,svm picks the heads
hint.sweep.POOL := ; SWEEP_POOLS=avg,max picks the poolings
hint.sweep.VIEWS := ; SWEEP_VIEWS=0,4 picks the views

space := $(subst ,, )
listed = $(if $(strip $(1)),$(subst $(space),$(comma) ,$(strip $(1))),no setting)
goals := $(or $(MAKECMDGOALS),help)
given := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
# unknown targets are left to make ("No rule to make target")
ifeq ($(filter undefined,$(foreach g,$(goals),$(origin takes.$(g)))),)
  unused := $(sort $(filter-out $(everyones_settings) $(foreach g,$(goals),$(takes.$(g))),$(given)))
  ifneq ($(unused),)
    takes_of = $(patsubst %@@,%,$(subst @@ ,; ,$(foreach g,$(goals),$(g) takes $(call listed,$(takes.$(g)))@@)))
    $(error make $(goals) does not use $(call listed,$(unused)) ($(if $(word 2,$(goals)),$(takes_of),it takes $(call listed,$(takes.$(goals)))))$(strip $(foreach g,$(goals),$(hint.$(g).$(firstword $(unused))))))
  endif
endif

.PHONY: help install features train-head train-all finetune sweep report audit predict export demo test lint bench bench-gpu clean

help: ## this list
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "Settings (make TARGET NAME=value):"
	@echo "  DATA=$(DATA)          images: DATA/train/<class>/ (+ DATA/validation/<class>/) or DATA/<class>/"
	@echo "                     or a CSV file with a header path,label[,split] (paths relative to the CSV)"
	@echo "  ARTIFACTS=$(ARTIFACTS)  caches, heads, report, predictions"
	@echo "  BACKBONE=$(BACKBONE)     vgg16 vgg19 resnet50 resnet50v2 inceptionv3 efficientnetv2b0 convnext_tiny mobilenetv3large"
	@echo "  WEIGHTS=$(WEIGHTS)     imagenet | none (random, seeded, flagged) | /path/to/<backbone> notop .h5"
	@echo "  SIZE= LAYER= BATCH=$(BATCH) DTYPE=$(DTYPE)   input size, cached layer (default: the backbone's), batch, stored type"
	@echo "  PRECISION=$(PRECISION)   auto: mixed_bfloat16 where the CPU has avx512_bf16/AMX (2x VGG16), the GPU's choice,"
	@echo "                     float32 elsewhere | float32 | mixed_float16 | mixed_bfloat16 (each its own cache)"
	@echo "  HEAD=$(HEAD)       logreg | svm | svm-linear | svm-nystroem | sgd | knn | dense;  POOL=avg|max|flatten"
	@echo "                     sgd: streamed over the cache, never holds the features (README: which head for which size)"
	@echo "  FOLDS=k            k-fold CV (default: 5 folds up to 200,000 training images, one held-out split above)"
	@echo "  SEED=$(SEED)             seed for every random choice"
	@echo "  REPEATS=r          train-head, finetune, sweep: r seeded k-fold partitions (default: as many as"
	@echo "                     BUDGET holds at the first partition's cost, at most 10 up to 1,000 training"
	@echo "                     images, 5 up to 5,000, 3 up to 20,000, then 1; a third for network heads)"
	@echo "  BUDGET=3           minutes one run's cross-validation may take when REPEATS is not given"
	@echo "  RACE=$(RACE) (sweep)     1: after the first partition, runs clearly worse than the best stop there"
	@echo "                     (screened out); 0: every run gets all its partitions"
	@echo "  AUGMENT=K (features) VIEWS=K (train-head)   cache / train on K augmented views per image"
	@echo "  GROUPS=near (train-head)   keep near-duplicate sets in one fold (a run of its own, -near)"
	@echo "  RUN=name (audit, predict)  the run to audit or use (default: the best current run)"
	@echo "  CLUSTER=local:N | tcp://host:8786   features, finetune, train-head, sweep, predict on Dask (README)"
	@echo "  REBUILD=1 (features)  embed every image again, e.g. after a Pillow/TensorFlow upgrade"
	@echo "  VERIFY=1 (features)   hash every file again (default: unchanged size+mtime+inode are trusted)"
	@echo "  MAPS=$(MAPS) (features)      0: pooled vectors only, for very large collections (no flatten/dense/finetune)"
	@echo "  PARAMS=\"C=0.1\"     head settings, fixed instead of tuned (dense: learning_rate=1e-3 epochs=50 ...)"
	@echo "  IMAGES=path RUN=name OUT=file.csv TTA=K   for predict (IMAGES: file, folder or .txt/.csv list;"
	@echo "                      RUN: best head; TTA: views averaged)"
	@echo "  TOPK=k (predict)    also the k best labels: label_2,probability_2,... (p_<class> always)"
	@echo "  FORMAT=$(FORMAT) (export)  npz | csv; with POOL=avg|max|flatten (default avg) and OUT=file"
	@echo "  SWEEP_HEADS=$(SWEEP_HEADS) SWEEP_POOLS=$(SWEEP_POOLS) SWEEP_VIEWS=$(SWEEP_VIEWS)  for sweep"
	@echo "  SWEEP_BACKBONES=vgg16,resnet50   sweep: extract each once (from DATA), rank them all together"
	@echo "  GALLERY=run|all   report: misclassified images of that run too (the best run's always)"
	@echo "  VERBOSE=1           also TensorFlow's own lines (start-up, CUDA, oneDNN); default: progress, results, warnings"
	@echo "A setting the target does not use stops it with what it takes (make predict HEAD=svm: use RUN=)"
	@echo "Full reference: $(PY) -m pipeline --help, and $(PY) -m pipeline COMMAND --help"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "error: Python 3.11+ is needed (pyproject.toml) and PYTHON=$(PYTHON) is older or missing; set PYTHON=python3.11, e.g. make $(or $(MAKECMDGOALS),install) PYTHON=python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dependencies

features: $(STAMP) ## embed every image once into ARTIFACTS/features/*.h5 (reruns: only new/changed)
	$(PY) -m pipeline features --data $(call q,DATA) --artifacts $(call q,ARTIFACTS) --weights $(call q,WEIGHTS) \
		--backbone $(BACKBONE) $(size_arg) $(layer_arg) --batch $(BATCH) --dtype $(DTYPE) --seed $(SEED) --precision $(PRECISION) --augment $(AUGMENT) \
		$(if $(filter 1,$(REBUILD)),--rebuild) $(if $(filter 1,$(VERIFY)),--verify) --maps $(MAPS) $(cluster_arg)

train-head: $(STAMP) ## cross-validate + save HEAD on the cached features (backbone never runs)
	$(PY) -m pipeline train-head --head $(HEAD) $(pool_arg) $(folds_arg) $(repeats_arg) --seed $(SEED) \
		--artifacts $(call q,ARTIFACTS) --views $(VIEWS) $(param_args) $(cluster_arg) --groups $(GROUPS)

train-all: $(STAMP) ## train-head for logreg, svm and dense
	for h in logreg svm dense; do $(MAKE) --no-print-directory train-head HEAD=$$h || exit $$?; done

finetune: $(STAMP) ## cache block4_pool once, then cross-validate block5 + head fine-tuned from it
	$(PY) -m pipeline finetune --data $(call q,DATA) --artifacts $(call q,ARTIFACTS) --weights $(call q,WEIGHTS) \
		--backbone $(BACKBONE) $(size_arg) --batch $(BATCH) --dtype $(DTYPE) --seed $(SEED) --precision $(PRECISION) --folds $(or $(FOLDS),5) $(repeats_arg) $(param_args) $(cluster_arg)

sweep: $(STAMP) ## every head x pooling x VIEWS on the cache, ranked, + learning curve
	$(PY) -m pipeline sweep --artifacts $(call q,ARTIFACTS) $(folds_arg) $(repeats_arg) $(race_arg) --seed $(SEED) \
		--heads $(SWEEP_HEADS) --pools $(SWEEP_POOLS) --views $(SWEEP_VIEWS) $(cluster_arg) \
		$(if $(SWEEP_BACKBONES),--backbones $(SWEEP_BACKBONES) --data $(call q,DATA) --weights $(call q,WEIGHTS) $(size_arg) --precision $(PRECISION))

report: $(STAMP) ## ARTIFACTS/report/report.{json,md,html} comparing every trained head
	$(PY) -m pipeline report --artifacts $(call q,ARTIFACTS) $(if $(GALLERY),--gallery $(GALLERY))

audit: $(STAMP) ## know your data from a run (RUN=, default the best): label errors, near-duplicates, leaks, outliers, calibration, map
	$(PY) -m pipeline audit --artifacts $(call q,ARTIFACTS) $(run_arg) --seed $(SEED)

predict: $(STAMP) ## classify IMAGES (file, folder, .txt/.csv list) into a CSV, streamed, resumable
	$(PY) -m pipeline predict --images $(call q,IMAGES) --artifacts $(call q,ARTIFACTS) $(run_arg) $(out_arg) $(tta_arg) $(topk_arg) $(cluster_arg) \
		$(if $(filter-out imagenet,$(value WEIGHTS)),--weights $(call q,WEIGHTS)) \
		$(if $(filter command line environment,$(origin BACKBONE)),--backbone $(BACKBONE))

export: $(STAMP) ## the cache's pooled features + paths, labels, split as FORMAT=npz|csv for other tools
	$(PY) -m pipeline export --artifacts $(call q,ARTIFACTS) --format $(FORMAT) --pool $(or $(POOL),avg) $(out_arg)

demo: $(STAMP) ## end to end on scikit-learn's digits as PNGs: features, 3 heads, report
	$(PY) -m pipeline demo --artifacts $(call q,ARTIFACTS)/demo --weights $(call q,WEIGHTS)

test: $(STAMP) ## every test, in two processes (pytest-xdist, a test file each at a time)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP) ## ruff
	$(PY) -m ruff check pipeline tests

bench: $(STAMP) ## speed and memory figures: ARTIFACTS/bench/bench.json (BENCH_SIZE=small|default|full, BENCH_ONLY=sweep,...)
	$(PY) -m pipeline.bench --artifacts $(call q,ARTIFACTS)/bench $(if $(BENCH_SIZE),--size $(BENCH_SIZE)) $(if $(BENCH_ONLY),--only $(BENCH_ONLY)) --precision $(PRECISION)

bench-gpu: $(STAMP) ## on a GPU machine: float32 vs mixed, batch 64-512, XLA, decode threads (ARTIFACTS/bench-gpu)
	$(PY) -m pipeline.bench --artifacts $(call q,ARTIFACTS)/bench-gpu --only gpu $(if $(BENCH_SIZE),--size $(BENCH_SIZE))

clean: ## remove generated output (keeps .venv and artifacts/README.md)
	find $(call q,ARTIFACTS) -mindepth 1 -maxdepth 1 ! -name README.md ! -name report-screenshot.png ! -name audit-screenshot.png -exec rm -rf {} + 2>/dev/null || true
