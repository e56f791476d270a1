# One command for the whole pipeline: collect -> stage 1 (encoder pre-training) -> stage 2 -> evaluation.
#   .\train_two_stage.ps1 experiment=quick
#   .\train_two_stage.ps1 -PretrainOnly | -TrainOnly [-PretrainedPath P] [-FreezeEncoder] [overrides]
# The work is done by two_stage.py, shared with train_two_stage.sh.
param(
    [switch]$PretrainOnly,
    [switch]$TrainOnly,
    [string]$PretrainedPath = "",
    [switch]$FreezeEncoder,
    [int]$NumProcesses = 0,
    [switch]$DryRun,
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Overrides = @()
)
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot
$argsList = @()
if ($PretrainOnly) { $argsList += "--pretrain-only" }
if ($TrainOnly) { $argsList += "--train-only" }
if ($PretrainedPath) { $argsList += @("--pretrained-path", $PretrainedPath) }
if ($FreezeEncoder) { $argsList += "--freeze-encoder" }
if ($NumProcesses -gt 0) { $argsList += @("--num-processes", "$NumProcesses") }
if ($DryRun) { $argsList += "--dry-run" }
$python = if ($env:PYTHON) { $env:PYTHON } else { "python" }
& $python two_stage.py @argsList @Overrides
exit $LASTEXITCODE
