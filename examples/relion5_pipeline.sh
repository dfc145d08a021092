#!/usr/bin/env bash
# From a RELION 5 project's particles.star + tomograms to new picks in RELION 5 format.
#
#   bash examples/relion5_pipeline.sh PARTICLES.star TOMOGRAMS_DIR OUT_DIR
#
# Environment (all optional):
#   VOXEL=10         voxel size (Å) to train and segment at (tomograms are Fourier-binned to it)
#   RADIUS=120       particle radius in Å (single class); or CLASSES=classes.csv
#   MODEL=ucaps      ucaps or unet
#   MINUTES=60       training budget (wall clock)
#   PATCH=           training patch size (default: train's)
#   TRAIN_ARGS=      more `cryocaps train` flags, e.g. "--val-fraction 0.3 --lr 5e-4"
#   DRY_RUN=1        print the commands instead of running them
set -euo pipefail
particles=${1:?particles.star}; tomograms=${2:?tomograms folder}; out=${3:?output folder}
VOXEL=${VOXEL:-10}; MODEL=${MODEL:-ucaps}; MINUTES=${MINUTES:-60}
if [[ -n "${CLASSES:-}" ]]; then radii=(--classes "$CLASSES"); else radii=(--radius-angstrom "${RADIUS:-120}"); fi
patch=(); [[ -n "${PATCH:-}" ]] && patch=(--patch-size "$PATCH")
read -r -a train_args <<< "${TRAIN_ARGS:-}"
run() { echo "+ $*"; [[ -n "${DRY_RUN:-}" ]] || "$@"; }

# 1. all tomograms at one voxel size, normalised
run cryocaps preprocess "$tomograms" -o "$out/tomograms" --voxel-size-angstrom "$VOXEL"
# 2. sphere label maps from the RELION 5 particles (centred Å -> voxels of each tomogram)
run cryocaps make-masks "$particles" --tomograms "$out/tomograms" "${radii[@]}" -o "$out/masks"
# 3. train (a checkpoint is saved every epoch; add --resume to continue after a wall-time stop)
run cryocaps train --tomograms "$out/tomograms" --labels "$out/masks" --classes "$out/masks/classes.csv" \
    --model "$MODEL" --max-minutes "$MINUTES" "${patch[@]}" "${train_args[@]}" -o "$out/model"
# 4. segment every tomogram, 5. picks back in RELION 5 format
run cryocaps segment "$out/tomograms" --model "$out/model" --probabilities -o "$out/segmentation"
run cryocaps cluster-picks "$out/segmentation" --format relion5 -o "$out/picks.star"
echo "picks: $out/picks.star (rlnTomoName + rlnCenteredCoordinate*Angst at ${VOXEL} Å)"
