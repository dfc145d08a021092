#!/usr/bin/env bash
# From a copick project to new picks in the same project: train on the runs that have picks,
# segment the runs that have none, write the picks back as a new copick user/session.
#
#   bash examples/copick_pipeline.sh CONFIG.json OUT_DIR
#
# The tomograms are read from the project's OME-Zarr images (no MRC copies); picks are read and
# written in copick's Å coordinates. Environment (all optional):
#   OBJECTS=ribosome,apo-ferritin   pickable objects to learn [default: every particle object]
#   PICKS_USER= PICKS_SESSION=      train on this user's / session's picks only [default: all]
#   TOMOGRAMS=wbp@10                tomogram type@voxel spacing (Å) [default: the project's only one]
#   USER_ID=cryocaps SESSION=1      copick user and session the new picks are written as
#   MODEL=ucaps MINUTES=60          model (ucaps or unet) and training budget (wall clock)
#   PATCH=                          training patch size [default: train's]
#   TRAIN_ARGS=                     more `cryocaps train` flags, e.g. "--val-fraction 0.3"
#   PICK_ARGS=                      more `cryocaps cluster-picks` flags, e.g. "--min-score 0.5"
#   DRY_RUN=1                       print the commands instead of running them
set -euo pipefail
config=${1:?copick config.json}; out=${2:?output folder}
MODEL=${MODEL:-ucaps}; MINUTES=${MINUTES:-60}; USER_ID=${USER_ID:-cryocaps}; SESSION=${SESSION:-1}
tomograms="$config${TOMOGRAMS:+:$TOMOGRAMS}"   # CONFIG.json[:TYPE@SPACING]: that tomogram of every run
select=(); [[ -n "${OBJECTS:-}" ]] && select+=(--copick-objects "$OBJECTS")
picks_select=("${select[@]}")
[[ -n "${PICKS_USER:-}" ]] && picks_select+=(--copick-user "$PICKS_USER")
[[ -n "${PICKS_SESSION:-}" ]] && picks_select+=(--copick-session "$PICKS_SESSION")
patch=(); [[ -n "${PATCH:-}" ]] && patch=(--patch-size "$PATCH")
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a pick_args <<< "${PICK_ARGS:-}"
run() { echo "+ $*"; [[ -n "${DRY_RUN:-}" ]] || "$@"; }
mkdir -p "$out"

# 1. the project's picks as a table: run -> tomo, object -> class_name, Å -> voxels
run cryocaps convert-picks "$config" "${picks_select[@]}" --format csv -o "$out/training_picks.csv" --overwrite

# 2. the tomogram of every run (named by its run), split into runs with picks and runs without
training=(); rest=()
if [[ -z "${DRY_RUN:-}" ]]; then
    picked=$(tail -n +2 "$out/training_picks.csv" | cut -d, -f1 | sort -u)
    while IFS=$'\t' read -r name path; do
        if grep -qxF "$name" <<< "$picked"; then training+=(--tomograms "$path"); else rest+=("$path"); fi
    done < <(python -c 'import sys
from cryocaps.io.layout import expand_volume_paths, tomogram_name
for path in expand_volume_paths(sys.argv[1:], "--tomograms"): print(tomogram_name(path), path, sep="\t")' \
        "$tomograms")
    [[ ${#training[@]} -gt 0 ]] || { echo "no run of $config has picks to train on" >&2; exit 2; }
    [[ ${#rest[@]} -gt 0 ]] || { echo "every run of $config has picks: nothing left to segment" >&2; exit 2; }
fi

# 3. sphere label maps (radii from the project's pickable objects), 4. train on them
run cryocaps make-masks "$out/training_picks.csv" "${training[@]}" --classes "$config" "${select[@]}" \
    -o "$out/masks" --overwrite
run cryocaps train "${training[@]}" --labels "$out/masks" --classes "$out/masks/classes.csv" \
    --model "$MODEL" --max-minutes "$MINUTES" "${patch[@]}" "${train_args[@]}" -o "$out/model"
# 5. segment the other runs (the Zarr level at the model's voxel size), 6. picks into the project
run cryocaps segment "${rest[@]}" --model "$out/model" -o "$out/segmentation"
run cryocaps cluster-picks "$out/segmentation" --format copick -o "$config" \
    --copick-user "$USER_ID" --copick-session "$SESSION" "${pick_args[@]}"
echo "picks: $config, user $USER_ID, session $SESSION"
