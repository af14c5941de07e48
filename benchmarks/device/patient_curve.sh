#!/usr/bin/env bash
# The fresh-student scaling curve's 10 M-sample points on one GPU, at most 10 minutes a call, resumable:
# the patient_curve part of the device script (benchmarks/device/run.py). Before the first call:
#   python benchmarks/device/pack.py --teachers resnet56-cifar10,vgg16bn-cifar10 --shots 1,10 --seeds 0
# then carry device-payload (and device-runs, the checkpoints a stopped call brought back).
set -euo pipefail
exec bash "$(dirname "$0")/run.sh" --parts patient_curve "$@"
