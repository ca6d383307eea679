#!/bin/bash
# The onset experiments of docs/onset.md, in parts ordered by what they test; each part resumes,
# and each merges every complete condition in OUT into onset.npz, onset.json and the figures.
# Run from the repository root: bash results/onset/experiments.sh (OUT=folder to write elsewhere).
# Width 100, A = 70, 4 periods of T = T0/eta, seeds 0-4 in every condition.
set -u
OUT=${OUT:-runs/onset}
COMMON="--seed 0-4 --periods 4 --out $OUT --quiet"
run() {  # a part that fails is reported and the next one runs; a signal (exit >= 128) stops all
    python run_spiral.py onset "$@" $COMMON && return
    local rc=$?; [ $rc -ge 128 ] && exit $rc; echo "part failed (exit $rc): $*" >&2
}
# 1. the entry-exit test: seed levels from float64 round-off to perturbations of 1e-4 per step
run --T0 5000 --betas relu,20 --dtypes float64,float32
run --T0 5000 --betas relu,20 --noise 1e-12,1e-8,1e-6,1e-4
# 2. the intervention: a smooth network forced along its top eigenvector with known sizes
run --T0 5000 --betas 20 --force 1e-5,1e-4,1e-3
# 3. the kinks approached: softplus beta towards ReLU
run --T0 5000 --betas 5,50,100,200,500
# 4. the learning rates (T = 5000/eta), for the exponent
run --T0 5000 --lrs 0.5,2,4 --betas relu
run --T0 5000 --lrs 2,4 --betas 20
# 5. the ramp: periods T0 from 1250 to 20000
run --T0 1250,2500,10000 --betas relu,20
run --T0 20000 --betas relu
