#!/usr/bin/env bash
# Re-runs configs/cifar10-derived.yaml in the order its committed cells were made (results/cifar10-derived/NOTES.md),
# then the rows CPU time did not reach. Every call resumes: finished cells are skipped, an interrupted one
# continues from its checkpoint under runs/.
set -u
cd "$(dirname "$0")/../.."
export GRAFTKD_DATA=${GRAFTKD_DATA:-../shared/data} GRAFTKD_TEACHERS=${GRAFTKD_TEACHERS:-../shared/teachers}
G="python benchmarks/derived/grid.py --config configs/cifar10-derived.yaml"
$G --pairs resnet56-resnet20 --rows derived+kd --shots 1,10 --seeds 0,1,2
$G --pairs resnet56-resnet20 --rows derived,derived+repair --shots 1,2,5,10 --seeds 0,1,2
$G --pairs vgg16bn-vgg16half --rows derived,derived+repair --shots 1 --seeds 0,1,2
$G --pairs vgg16bn-vgg16graft --rows derived,derived+repair --shots 1,2,5,10 --seeds 0,1,2
$G --pairs vgg16bn-vgg16half --rows derived+kd --shots 10,1 --seeds 0
$G --pairs vgg16bn-vgg16graft --rows derived+repair+kd --shots 1 --seeds 0
$G --pairs vgg16bn-vgg16half --rows derived,derived+repair --shots 10,2,5 --seeds 0,1,2
$G --pairs resnet56-resnet20 --rows derived+kd-auto --shots 10,1 --seeds 0,1,2
$G --pairs resnet56-resnet20 --rows derived+kd-128k-auto --shots 10 --seeds 0
$G --pairs vgg16bn-vgg16half --rows derived+feature_kd-64k-auto --shots 1 --seeds 0
$G --pairs resnet56-resnet20 --rows fresh+kd-patient-auto --shots 10 --seeds 0
# not reached in the committed run
$G --pairs resnet56-resnet20 --rows derived+feature_kd --shots 10 --seeds 0
$G --pairs vgg16bn-vgg16half --rows derived+repair+kd --shots 1 --seeds 0
$G --pairs resnet56-resnet20,vgg16bn-vgg16graft --rows derived+graft --shots 1 --seeds 0
$G --pairs vgg16bn-vgg16half --rows derived+kd --shots 1,10 --seeds 1,2
$G --rows derived+kd --shots 2,5 --seeds 0,1,2
$G
