#!/usr/bin/env bash
# One command for the whole pipeline: collect -> stage 1 (encoder pre-training) -> stage 2 -> evaluation.
#   bash train_two_stage.sh experiment=quick
#   bash train_two_stage.sh --pretrain-only | --train-only [--pretrained-path P] [--freeze-encoder] [overrides]
# The work is done by two_stage.py, shared with train_two_stage.ps1.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" two_stage.py "$@"
