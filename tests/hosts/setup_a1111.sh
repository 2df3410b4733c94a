#!/usr/bin/env bash
# Build a headless AUTOMATIC1111 v1.10.1 test environment from fetched git snapshots.
#
#   tests/hosts/setup_a1111.sh [--mirror DIR] [--webui GITDIR] [--ref REF]
#                              [--stablediffusion GITDIR] [--generative-models GITDIR]
#                              [--k-diffusion GITDIR] [--blip GITDIR] [--forge GITDIR] [DEST]
#
# Each GITDIR is a bare git directory (as the search tool's `fetch` leaves them,
# /work/.mirror/<owner>+<name>/repo); by default they are looked up under --mirror
# (default /work/.mirror). Nothing is cloned from the network; only PyPI is used.
# The Forge snapshot is needed only for the CLIP-L tokenizer/config files that
# build an offline Hugging Face cache for openai/clip-vit-large-patch14.
#
# Result (DEST, or --dest, default /work/hosts/a1111):
#   DEST/webui          A1111 v1.10.1 tree, repositories/ at the commits pinned in
#                       modules/launch_utils.py
#   DEST/venv           Python 3.10 venv: torch==2.1.2 torchvision==0.16.2,
#                       requirements_versions.txt, clip-anytorch
#   DEST/hf-home        offline HF cache (HF_HOME) with openai/clip-vit-large-patch14
# and the env variables to use are printed at the end (also written to DEST/env.sh).
# Idempotent: a second run re-extracts only what changed and skips installed packages.
set -euo pipefail
HOSTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # tests/hosts: shared helper scripts

DEST=/work/hosts/a1111
MIRROR=/work/.mirror
REF='v1.10.1^{commit}'
WEBUI_GIT= SD_GIT= SGM_GIT= KD_GIT= BLIP_GIT= FORGE_GIT=
PYVER=${A1111_PYVER:-3.10}

while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=$2; shift 2;;
    --mirror) MIRROR=$2; shift 2;;
    --ref) REF=$2; shift 2;;
    --webui) WEBUI_GIT=$2; shift 2;;
    --stablediffusion) SD_GIT=$2; shift 2;;
    --generative-models) SGM_GIT=$2; shift 2;;
    --k-diffusion) KD_GIT=$2; shift 2;;
    --blip) BLIP_GIT=$2; shift 2;;
    --forge) FORGE_GIT=$2; shift 2;;
    -h|--help) sed -n '2,25p' "$0"; exit 0;;
    -*) echo "unknown argument: $1" >&2; exit 2;;
    *) DEST=$1; shift;;  # a positional argument is the destination
  esac
done
: "${WEBUI_GIT:=$MIRROR/kklouzal+stable-diffusion-webui/repo}"
: "${SD_GIT:=$MIRROR/Stability-AI+stablediffusion/repo}"
: "${SGM_GIT:=$MIRROR/Stability-AI+generative-models/repo}"
: "${KD_GIT:=$MIRROR/crowsonkb+k-diffusion/repo}"
: "${BLIP_GIT:=$MIRROR/salesforce+BLIP/repo}"
: "${FORGE_GIT:=$MIRROR/lllyasviel+stable-diffusion-webui-forge/repo}"
for g in "$WEBUI_GIT" "$SD_GIT" "$SGM_GIT" "$KD_GIT" "$BLIP_GIT" "$FORGE_GIT"; do
  git --git-dir="$g" rev-parse --verify -q HEAD >/dev/null || { echo "not a git dir: $g" >&2; exit 1; }
done

# extract GITDIR REF DEST: every blob of that commit into DEST (tests/hosts/extract_snapshot.py;
# no work tree, no network; skipped when DEST/.snapshot-commit already matches).
extract() { python3 "$HOSTS_DIR/extract_snapshot.py" "$@"; }

pinned() {  # pinned commit hash for NAME_commit_hash in A1111's launch_utils.py
  sed -n "s/.*'$1', \"\([0-9a-f]\{40\}\)\".*/\1/p" "$DEST/webui/modules/launch_utils.py" | head -1
}
checkout_pinned() {  # GITDIR ENVNAME FOLDER
  local c; c=$(pinned "$2")
  if [ -n "$c" ] && git --git-dir="$1" cat-file -e "$c^{commit}" 2>/dev/null; then
    extract "$1" "$c" "$DEST/webui/repositories/$3"
  else
    echo "  WARNING: pinned commit '$c' for $3 not in $1; using its HEAD" >&2
    extract "$1" HEAD "$DEST/webui/repositories/$3"
  fi
}

echo "== extracting A1111 ($REF) into $DEST/webui"
extract "$WEBUI_GIT" "$REF" "$DEST/webui"
checkout_pinned "$SD_GIT" STABLE_DIFFUSION_COMMIT_HASH stable-diffusion-stability-ai
checkout_pinned "$SGM_GIT" STABLE_DIFFUSION_XL_COMMIT_HASH generative-models
checkout_pinned "$KD_GIT" K_DIFFUSION_COMMIT_HASH k-diffusion
checkout_pinned "$BLIP_GIT" BLIP_COMMIT_HASH BLIP
mkdir -p "$DEST/webui/repositories/stable-diffusion-webui-assets" "$DEST/webui/models/Stable-diffusion" "$DEST/webui/models/Lora"

echo "== offline HF cache for openai/clip-vit-large-patch14 (files from Forge's backend/huggingface)"
SNAP=$DEST/hf-home/hub/models--openai--clip-vit-large-patch14/snapshots/fidelityquant-offline
mkdir -p "$SNAP" "$DEST/hf-home/hub/models--openai--clip-vit-large-patch14/refs"
FORGE_SD15=backend/huggingface/runwayml/stable-diffusion-v1-5
FORGE_HEAD=$(git --git-dir="$FORGE_GIT" rev-parse HEAD)
for f in merges.txt special_tokens_map.json tokenizer_config.json vocab.json; do
  git --git-dir="$FORGE_GIT" show "$FORGE_HEAD:$FORGE_SD15/tokenizer/$f" > "$SNAP/$f"
done
git --git-dir="$FORGE_GIT" show "$FORGE_HEAD:$FORGE_SD15/text_encoder/config.json" > "$SNAP/config.json"
printf 'fidelityquant-offline' > "$DEST/hf-home/hub/models--openai--clip-vit-large-patch14/refs/main"

echo "== venv (Python $PYVER)"
PYBIN=
if command -v pyenv >/dev/null 2>&1; then
  v=$(pyenv versions --bare | grep -E "^${PYVER//./\\.}\.[0-9]+$" | sort -V | tail -1 || true)
  [ -n "$v" ] && PYBIN=$(pyenv root)/versions/$v/bin/python
fi
[ -n "$PYBIN" ] || PYBIN=$(command -v "python$PYVER" || true)
[ -n "$PYBIN" ] || { echo "no Python $PYVER found (pyenv or python$PYVER)" >&2; exit 1; }
[ -x "$DEST/venv/bin/python" ] || "$PYBIN" -m venv "$DEST/venv"
PY=$DEST/venv/bin/python
installed() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1').split('+')[0] == '$2' else 1)" 2>/dev/null; }
# torch 2.1.2 from PyPI is a CUDA build; it runs on CPU. The machine-wide pip
# constraint file (if any) only caps versions, so it does not get in the way.
installed torch 2.1.2 && installed torchvision 0.16.2 || "$PY" -m pip install torch==2.1.2 torchvision==0.16.2
if [ ! -f "$DEST/venv/.reqs-done" ] || ! cmp -s "$DEST/webui/requirements_versions.txt" "$DEST/venv/.reqs-done"; then
  (cd "$DEST/webui" && "$PY" -m pip install -r requirements_versions.txt torch==2.1.2 torchvision==0.16.2)
  # k-diffusion imports `clip` (A1111 installs openai/CLIP from a GitHub zip; the
  # same package is on PyPI as clip-anytorch).
  "$PY" -m pip install clip-anytorch torch==2.1.2 torchvision==0.16.2
  cp "$DEST/webui/requirements_versions.txt" "$DEST/venv/.reqs-done"
fi
"$PY" -c "import torch, torchvision, transformers, clip; print('  torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"

cat > "$DEST/env.sh" <<ENV
export A1111_PATH=$DEST/webui
export A1111_PYTHON=$DEST/venv/bin/python
export A1111_HF_HOME=$DEST/hf-home
ENV
echo "== done. Use:"
cat "$DEST/env.sh"
echo "# start with: HF_HOME=\$A1111_HF_HOME HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \$A1111_PYTHON launch.py --skip-prepare-environment ... (see tests/hosts/check_hosts.py)"
