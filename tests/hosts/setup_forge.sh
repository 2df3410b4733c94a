#!/usr/bin/env bash
# Build a headless Stable Diffusion WebUI Forge test environment from fetched git snapshots.
#
#   tests/hosts/setup_forge.sh [--mirror DIR] [--forge GITDIR] [--ref REF] [--blip GITDIR] [DEST]
#
# Each GITDIR is a bare git directory (as the search tool's `fetch` leaves them,
# /work/.mirror/<owner>+<name>/repo); by default they are looked up under --mirror
# (default /work/.mirror). Nothing is cloned from the network; only PyPI is used.
#
# Result (DEST, or --dest, default /work/hosts/forge):
#   DEST/webui   Forge tree (default ref: the snapshot's HEAD), repositories/BLIP at the
#                commit pinned in modules/launch_utils.py, an empty
#                repositories/stable-diffusion-webui-assets
#   DEST/venv    Python 3.11 venv: requirements_versions.txt, torch==2.12.1
#                torchvision==0.27.1 (PyPI CUDA build, runs on CPU), huggingface-guess==0.1.0
#                (instead of the repositories/huggingface_guess clone), joblib
# and the env variables to use are printed at the end (also written to DEST/env.sh).
# Forge reads its configs/tokenizers from backend/huggingface/, so no HF cache is needed.
# Idempotent: a second run re-extracts only what changed and skips installed packages.
set -euo pipefail
HOSTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # tests/hosts: shared helper scripts

DEST=/work/hosts/forge
MIRROR=/work/.mirror
REF=HEAD
FORGE_GIT= BLIP_GIT=
PYVER=${FORGE_PYVER:-3.11}
TORCH_PINS="torch==2.12.1 torchvision==0.27.1"

while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=$2; shift 2;;
    --mirror) MIRROR=$2; shift 2;;
    --ref) REF=$2; shift 2;;
    --forge) FORGE_GIT=$2; shift 2;;
    --blip) BLIP_GIT=$2; shift 2;;
    -h|--help) sed -n '2,19p' "$0"; exit 0;;
    -*) echo "unknown argument: $1" >&2; exit 2;;
    *) DEST=$1; shift;;  # a positional argument is the destination
  esac
done
: "${FORGE_GIT:=$MIRROR/lllyasviel+stable-diffusion-webui-forge/repo}"
: "${BLIP_GIT:=$MIRROR/salesforce+BLIP/repo}"
for g in "$FORGE_GIT" "$BLIP_GIT"; do
  git --git-dir="$g" rev-parse --verify -q HEAD >/dev/null || { echo "not a git dir: $g" >&2; exit 1; }
done

# extract GITDIR REF DEST: every blob of that commit into DEST (tests/hosts/extract_snapshot.py;
# no work tree, no network; skipped when DEST/.snapshot-commit already matches).
extract() { python3 "$HOSTS_DIR/extract_snapshot.py" "$@"; }

echo "== extracting Forge ($REF) into $DEST/webui"
extract "$FORGE_GIT" "$REF" "$DEST/webui"
BLIP_PIN=$(sed -n "s/.*'BLIP_COMMIT_HASH', \"\([0-9a-f]\{40\}\)\".*/\1/p" "$DEST/webui/modules/launch_utils.py" | head -1)
if [ -n "$BLIP_PIN" ] && git --git-dir="$BLIP_GIT" cat-file -e "$BLIP_PIN^{commit}" 2>/dev/null; then
  extract "$BLIP_GIT" "$BLIP_PIN" "$DEST/webui/repositories/BLIP"
else
  echo "  WARNING: pinned BLIP commit '$BLIP_PIN' not in $BLIP_GIT; using its HEAD" >&2
  extract "$BLIP_GIT" HEAD "$DEST/webui/repositories/BLIP"
fi
mkdir -p "$DEST/webui/repositories/stable-diffusion-webui-assets" "$DEST/webui/models/Stable-diffusion" "$DEST/webui/models/Lora"

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
# The local CPU torch wheel (2.13) has no matching torchvision and Forge imports
# torchvision, so the PyPI build is pinned with its torchvision.
if [ ! -f "$DEST/venv/.reqs-done" ] || ! cmp -s "$DEST/webui/requirements_versions.txt" "$DEST/venv/.reqs-done"; then
  (cd "$DEST/webui" && "$PY" -m pip install -r requirements_versions.txt $TORCH_PINS huggingface-guess==0.1.0 joblib)
  cp "$DEST/webui/requirements_versions.txt" "$DEST/venv/.reqs-done"
fi
"$PY" -c "import torch, torchvision, transformers, diffusers, huggingface_guess; print('  torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"

cat > "$DEST/env.sh" <<ENV
export FORGE_PATH=$DEST/webui
export FORGE_PYTHON=$DEST/venv/bin/python
ENV
echo "== done. Use:"
cat "$DEST/env.sh"
echo "# start with: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \$FORGE_PYTHON launch.py --skip-prepare-environment --always-cpu ... (see tests/hosts/check_hosts.py)"
