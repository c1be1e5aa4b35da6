#!/usr/bin/env bash
# The paper's evaluation, as the official scripts/eval.sh: 50 images x 1000 classes with cfg 1.5, top-k 900,
# top-p 0.96 and 10 -> 10 iterations per scale, written to samples/implicit-viar.pth-cfg-1.5-seed-1/ and packed into
# samples/implicit-viar.pth-cfg-1.5-seed-1.npz, then FID / sFID / IS / precision / recall with evaluator.py.
#
#   bash scripts/eval.sh [REFERENCE_NPZ] [extra sampling.py flags, e.g. --iter_left 10 --iter_right 5]
#
# Environment: CKPT (ckpts/viar.pth), VAE (ckpts/vae_ch160v4096z32.pth), NPROC (all visible GPUs, else 1),
# NAME (run name; default the official one, extended by any knob the extra flags change), SAMPLE_DIR (samples),
# EVAL_ARGS (extra evaluator.py flags, e.g. "--inception ckpts/pt_inception-2015-12-05-6726825d.pth" for IS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3

ref="${1:-data/VIRTUAL_imagenet256_labeled.npz}"
shift || true
ckpt="${CKPT:-ckpts/viar.pth}"
vae="${VAE:-ckpts/vae_ch160v4096z32.pth}"
sample_dir="${SAMPLE_DIR:-samples}"
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
for f in "$ref" "$ckpt" "$vae"; do
    [ -f "$f" ] || { echo "eval.sh: error: file not found: $f" >&2; exit 2; }
done

# The official sampling command (its --depth 30 --use_implicit True are assertions here, left to the checkpoint).
args=(--ckpt_path "$ckpt" --vae_ckpt "$vae" --cfg 1.5 --sample_dir "$sample_dir" --iter_left 10 --iter_right 10)
[ -z "${NAME:-}" ] || args+=(--name "$NAME")
args+=("$@")
npz="$("$py" sampling.py "${args[@]}" --dry_run)"
"$py" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" sampling.py "${args[@]}"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
"$py" evaluator.py "$ref" "$npz" ${EVAL_ARGS:-}
