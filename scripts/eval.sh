#!/usr/bin/env bash
# The paper's evaluation: 50 images x 1000 classes with cfg 1.5, top-k 900, top-p 0.96 and the 10->10 schedule,
# packed into an ADM .npz, then FID / sFID / IS / precision / recall with evaluator.py.
#
#   bash scripts/eval.sh [REFERENCE_NPZ] [extra sampling.py flags, e.g. --schedule linear:10,5]
#
# Environment: CKPT (ckpts/viar.pth), VAE (ckpts/vae_ch160v4096z32.pth), NPROC (all visible GPUs, else 1),
# NAME (run name; default from the checkpoint and the paper's knobs), SAMPLE_DIR (samples).
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
name="${NAME:-$(basename "$ckpt")-cfg1.5-paper-seed1}"
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
for f in "$ref" "$ckpt" "$vae"; do
    [ -f "$f" ] || { echo "eval.sh: error: file not found: $f" >&2; exit 2; }
done

"$py" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" sampling.py \
    --ckpt "$ckpt" --vae_ckpt "$vae" --cfg 1.5 --top_k 900 --top_p 0.96 --schedule linear:10,10 \
    --per_class 50 --seed 1 --sample_dir "$sample_dir" --name "$name" "$@"
"$py" evaluator.py "$ref" "$sample_dir/$name.npz"
