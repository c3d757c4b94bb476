#!/usr/bin/env bash
# Screenshot TensorBoard's HParams dashboard over a sweep folder with headless Chromium (Debian:
# `apt-get install chromium`), to check that the runs' HParams sessions render in the real UI.
#   bash experiments/screenshot_hparams.sh experiments/stacked-digits experiments/stacked-digits/hparams.png
set -euo pipefail
logdir=${1:?usage: screenshot_hparams.sh LOGDIR OUT.png [PORT]}
out=${2:?usage: screenshot_hparams.sh LOGDIR OUT.png [PORT]}
port=${3:-6199}
python=${PYTHON:-.venv/bin/python}
"$python" -m tensorboard.main --logdir "$logdir" --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
for _ in $(seq 60); do  # wait until TensorBoard answers
  curl -sf "http://localhost:$port/data/runs" >/dev/null && break
  sleep 1
done
sleep 5  # let it load the event files
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=2300,560 \
  --virtual-time-budget=20000 --screenshot="$out" "http://localhost:$port/#hparams" 2>/dev/null
echo "wrote $out"
