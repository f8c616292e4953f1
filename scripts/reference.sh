#!/usr/bin/env bash
# `make reference`: train the reference study (sweeps/reference.yaml) and rebuild docs/reference/.
#
# Resumable on any machine: every point whose records are committed under docs/reference/runs/
# (config, metrics, summary; never checkpoints) is taken from there instead of trained, every
# point that finishes here is added there at once, and an interrupted point resumes from its own
# checkpoint in $REF_DIR. Workers share the study through its run locks (each point is trained
# once; a point another worker holds is skipped). Then the expert-choice runs named in
# REF_ANALYZE that have weights here are analysed, and `ecdit plot` rewrites the report.
set -euo pipefail

ECDIT=${ECDIT:-.venv/bin/ecdit}
PYTHON=${PYTHON:-.venv/bin/python}
SPEC=${REF_SPEC:-sweeps/reference.yaml}
STUDY=${REF_DIR:-results/reference}
DOCS=${REF_DOCS:-docs/reference}
JOBS=${REF_JOBS:-2}
THREADS=${REF_THREADS:-1}  # per worker: JOBS x THREADS = the cores to use
# Expert-choice runs to analyse: the largest first (the report shows its figures; the others add
# their numbers, pooled over seeds).
# (REF_ANALYZE=" " analyses none.)
ANALYZE=${REF_ANALYZE:-medium-ec-e8-f2-s0 medium-ec-e8-f2-s1 mini-ec-e8-f2-s0 mini-ec-e8-f2-s1 mini-ec-e8-f2-s2}

start=$(date +%s)
"$ECDIT" sweep "$SPEC" -o "$STUDY"
pids=()
for i in $(seq "$JOBS"); do
  OMP_NUM_THREADS=$THREADS "$ECDIT" train --sweep "$STUDY" --quiet --archive "$DOCS/runs" &
  pids+=($!)
  [ "$i" -lt "$JOBS" ] && sleep 20  # let the first worker take its point before the next one looks
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
trained=$(( $(date +%s) - start ))
[ "$status" -eq 0 ] || { echo "reference: a worker failed (see $STUDY/runs/*/train.log); rerun to resume" >&2; exit 1; }

"$ECDIT" archive "$STUDY" "$DOCS/runs"
cp "$STUDY/study.yaml" "$STUDY/manifest.csv" "$DOCS/"
for run in $ANALYZE; do
  if [ -f "$STUDY/runs/$run/final/model.pt" ]; then
    # An analysis newer than the weights is reused (a rerun of `make reference` does not redo it).
    if [ ! "$STUDY/analyze/$run/analyze.json" -nt "$STUDY/runs/$run/final/model.pt" ]; then
      "$ECDIT" analyze "$STUDY/runs/$run" --cfg 2 -o "$STUDY/analyze/$run"
    fi
    mkdir -p "$DOCS/analyze/$run"
    cp "$STUDY/analyze/$run/analyze.json" "$DOCS/analyze/$run/"
    if [ "$run" = "${ANALYZE%% *}" ]; then
      cp "$STUDY/analyze/$run/object_vs_background.png" "$STUDY/analyze/$run/heatmaps.png" "$DOCS/analyze/$run/"
    fi
  else
    echo "reference: $run has no weights here (its records came from the archive): keeping its committed analysis"
  fi
done
"$ECDIT" plot "$DOCS"
"$PYTHON" scripts/provenance.py "$DOCS" --command "${REF_COMMAND:-make reference} REF_JOBS=$JOBS REF_THREADS=$THREADS" \
  --this-run-seconds "$trained"
