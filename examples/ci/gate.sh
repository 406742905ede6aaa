#!/usr/bin/env bash
# The release gate: compile RECIPE on a candidate model, verify it, keep the reports.
#
#   examples/ci/gate.sh RECIPE [MODEL]
#
# MODEL (default: the recipe's own `model:`) is the candidate checkpoint: a diffusers folder,
# a single .safetensors/.ckpt file or a Hugging Face cache repo id. The script runs
#
#   editc compile RECIPE --model MODEL --out $EDITC_GATE_OUT/model --verify --force
#
# copies report.html, junit.xml, verify.json and manifest.json to $EDITC_GATE_OUT/artifacts
# (whatever the outcome), prints one verdict line and exits with editc's own exit code:
#   0 every gate passed · 1 a gate failed · 2 bad input (recipe, model, arguments) · else a bug.
#
# Environment:
#   EDITC            the editc command (default: editc; e.g. "python -m compiler.cli")
#   EDITC_GATE_OUT   output folder (default: editc-gate)
#   EDITC_CACHE_DIR  editc's cache (restore it between jobs: the base model's verify images,
#                    located layers and preservation Grams are reused from it)
set -u

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "gate.sh: error: usage: gate.sh RECIPE [MODEL]" >&2
    exit 2
fi
recipe=$1
out=${EDITC_GATE_OUT:-editc-gate}
read -r -a editc <<< "${EDITC:-editc}"

args=(compile "$recipe" --out "$out/model" --verify --force --quiet)
if [ "$#" -eq 2 ]; then
    args+=(--model "$2")
fi

"${editc[@]}" "${args[@]}"
code=$?

# Artifacts: what exists (a run refused at the recipe leaves none).
mkdir -p "$out/artifacts"
for file in "$out/model/manifest.json" "$out/model/verify/report.html" "$out/model/verify/junit.xml" \
            "$out/model/verify/verify.json"; do
    if [ -f "$file" ]; then
        cp "$file" "$out/artifacts/"
    fi
done

case $code in
    0) verdict="PASSED: every gate passed" ;;
    1) verdict="FAILED: a verify gate failed (see $out/artifacts/report.html)" ;;
    2) verdict="BAD INPUT: fix the recipe, the model path or the arguments (the line above says which)" ;;
    126|127) verdict="ERROR: could not run '${editc[*]}': install editc or set EDITC" ;;
    *) verdict="ERROR: editc exited $code, a bug in editc" ;;
esac
echo "editc gate: $verdict (exit $code)" >&2
exit "$code"
