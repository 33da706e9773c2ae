# Two commands do all the set-up on a fresh machine:
#   make run   - create .venv, install requirements.txt, train the default model (python train.py), evaluate it (python test.py)
#   make test  - create .venv, install requirements-dev.txt (adds pytest and the reference implementations), run the tests
# and, for the experiments: make adapters (few-shot benchmark), make anomaly (AA-CLIP), make bench (speed)
PY := .venv/bin/python

.PHONY: run test bench adapters anomaly clean

.venv/runtime.stamp: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.venv/dev.stamp: .venv/runtime.stamp requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# a second `make run` continues (or, if finished, just re-evaluates) out/shapes instead of refusing to overwrite it
run: .venv/runtime.stamp
	$(PY) train.py $$(test -f out/shapes/last.pt && echo --resume)
	$(PY) test.py

test: .venv/dev.stamp
	$(PY) -m pytest -q

bench: .venv/dev.stamp
	$(PY) bench.py all

clean:
	rm -rf .venv out

adapters: .venv/runtime.stamp
	$(PY) adapters.py benchmark

anomaly: .venv/runtime.stamp
	test -f out/shapes/last.pt || $(MAKE) run
	$(PY) train.py --method aa-clip --init out/shapes/last.pt $$(test -f out/aa-clip/aa_state.pt && echo --resume)
