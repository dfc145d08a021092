#!/usr/bin/env bash
# From a STOPGAP motivelist + tomograms to new picks as a STOPGAP motivelist.
#
#   bash examples/stopgap_pipeline.sh MOTL.star TOMOGRAMS_DIR OUT_DIR
#
# STOPGAP positions are 1-based (orig + shift) in the tomograms' pixels;
# tomo_num N is the tomogram whose name ends in N (tomo_1.mrc, TS_01.mrc), else
# the N-th tomogram. Environment as in relion5_pipeline.sh, plus:
#   COORDS_PIXEL=    pixel size (Å) of the motivelist's coordinates when it is
#                    not the tomograms' (e.g. 5.4 for bin-1 coordinates)
set -euo pipefail
motl=${1:?motivelist.star}; tomograms=${2:?tomograms folder}; out=${3:?output folder}
VOXEL=${VOXEL:-10}; MODEL=${MODEL:-ucaps}; MINUTES=${MINUTES:-60}
if [[ -n "${CLASSES:-}" ]]; then radii=(--classes "$CLASSES"); else radii=(--radius-angstrom "${RADIUS:-120}"); fi
patch=(); [[ -n "${PATCH:-}" ]] && patch=(--patch-size "$PATCH")
read -r -a train_args <<< "${TRAIN_ARGS:-}"
pixel=(); [[ -n "${COORDS_PIXEL:-}" ]] && pixel=(--coords-pixel-size-angstrom "$COORDS_PIXEL")
run() { echo "+ $*"; [[ -n "${DRY_RUN:-}" ]] || "$@"; }

run cryocaps preprocess "$tomograms" -o "$out/tomograms" --voxel-size-angstrom "$VOXEL"
run cryocaps make-masks "$motl" --tomograms "$out/tomograms" "${radii[@]}" "${pixel[@]}" -o "$out/masks"
run cryocaps train --tomograms "$out/tomograms" --labels "$out/masks" --classes "$out/masks/classes.csv" \
    --model "$MODEL" --max-minutes "$MINUTES" "${patch[@]}" "${train_args[@]}" -o "$out/model"
run cryocaps segment "$out/tomograms" --model "$out/model" --probabilities -o "$out/segmentation"
run cryocaps cluster-picks "$out/segmentation" --format stopgap -o "$out/picks_motl.star"
echo "picks: $out/picks_motl.star (data_stopgap_motivelist, 1-based, at ${VOXEL} Å)"
