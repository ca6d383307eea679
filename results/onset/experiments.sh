#!/bin/bash
# The onset experiments of docs/onset.md's "What it found", in seven parts; each resumes,
# and each merges every complete condition in OUT into onset.npz, onset.json and the figures.
# Run from the repository root: bash results/onset/experiments.sh (OUT=folder to write elsewhere).
set -u
OUT=${OUT:-runs/onset}
COMMON="--seed 0-9 --periods 4 --out $OUT"
python run_spiral.py onset --T0 1250,2500,5000,10000,20000 --lrs 1 $COMMON   # the ramp: T
python run_spiral.py onset --T0 5000 --lrs 0.5,2,4 $COMMON                     # the learning rates
python run_spiral.py onset --T0 5000 --dtypes float32 $COMMON                  # float32
python run_spiral.py onset --T0 5000 --noise 1e-12,1e-8 $COMMON                # perturbed at every step
python run_spiral.py onset --T0 2500,5000 --betas 5,20 $COMMON                 # softplus: T
python run_spiral.py onset --T0 5000 --lrs 2,4 --betas 5,20 $COMMON            # softplus: learning rates
python run_spiral.py onset --T0 1250,10000 --betas 20 $COMMON                  # softplus: two more T
