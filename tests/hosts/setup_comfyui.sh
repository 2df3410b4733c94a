#!/usr/bin/env bash
# A headless, CPU-only ComfyUI host for the integration tests (tests/test_comfyui_*.py, tests/test_adapters.py).
#
#   tests/hosts/setup_comfyui.sh <snapshot git dir> <dest dir> [python]
#
# 1. Writes out the snapshot's HEAD tree (a bare git dir, e.g. what `fetch github:Comfy-Org/ComfyUI` returns)
#    into <dest>, blob by blob. Blobs absent from the snapshot (files over 4 MiB) are skipped and listed in
#    <dest>/.fidelityquant_missing_blobs.
# 2. Creates <dest>/_shims/: a minimal pure-Python `torchvision` (PyPI's torchvision does not load beside a
#    local torch build such as 2.13.0+cpu), plus this ComfyUI's own pinned data packages
#    (comfyui-frontend-package, comfyui-workflow-templates, comfyui-embedded-docs), so that two hosts of
#    different versions can share one Python environment. tests/comfyui_env.py and
#    tests/test_comfyui_server.py put <dest>/_shims on the path by themselves.
# 3. Installs ComfyUI's other requirements that are missing from [python]'s environment (default: this
#    repository's .venv), with their dependencies, never torch / torchvision / torchaudio.
#
# Idempotent: rerunning with the same snapshot changes nothing; with another snapshot it replaces the files
# of the previous one (files ComfyUI created, e.g. user/, stay). Set COMFYUI_SETUP_CHECK=1 to finish with
# `main.py --cpu --quick-test-for-ci` in a temporary base directory.
set -euo pipefail

usage() { echo "usage: $0 <snapshot git dir> <dest dir> [python]" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
SNAP=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${3:-$REPO/.venv/bin/python}
mkdir -p "$2"
DEST=$(cd "$2" && pwd)
case "$DEST/" in "$REPO"/*) echo "refusing to extract third-party code inside the repository: $DEST" >&2; exit 2;; esac
[[ -x $PY ]] || { echo "no python at $PY" >&2; exit 2; }
GIT=(git --git-dir="$SNAP")

# --- 1. extract ---------------------------------------------------------------------------------------------
commit=$("${GIT[@]}" rev-parse HEAD)
marker=$DEST/.fidelityquant_snapshot
manifest=$DEST/.fidelityquant_files
if [[ -f $marker && $(head -n1 "$marker") == "$commit" ]]; then
    echo "snapshot $commit already extracted in $DEST"
else
    if [[ -f $manifest ]]; then  # another snapshot was extracted here: remove its files first
        echo "replacing snapshot $(head -n1 "$marker" 2>/dev/null || echo '?') in $DEST"
        while IFS= read -r -d '' f; do rm -f -- "$DEST/$f"; done < "$manifest"
    fi
    rm -f "$marker" "$manifest"
    : > "$DEST/.fidelityquant_missing_blobs"
    # Which blobs the snapshot holds (one batch call rather than one process per file).
    declare -A present=()
    while read -r hash type _; do
        [[ $type == missing ]] || present[$hash]=1
    done < <("${GIT[@]}" ls-tree -r HEAD | awk '$2 == "blob" {print $3}' | "${GIT[@]}" cat-file --batch-check)
    n=0 skipped=0
    while IFS= read -r -d '' entry; do
        read -r mode type hash <<< "${entry%%$'\t'*}"
        path=${entry#*$'\t'}
        [[ $type == blob ]] || { echo "skipping $type $path"; continue; }  # submodules
        if [[ -z ${present[$hash]:-} ]]; then
            printf '%s\n' "$path" >> "$DEST/.fidelityquant_missing_blobs"; skipped=$((skipped + 1)); continue
        fi
        mkdir -p "$DEST/$(dirname "$path")"
        rm -f -- "$DEST/$path"
        if [[ $mode == 120000 ]]; then
            ln -s "$("${GIT[@]}" cat-file blob "$hash")" "$DEST/$path"
        else
            "${GIT[@]}" cat-file blob "$hash" > "$DEST/$path"
            [[ $mode == 100755 ]] && chmod +x "$DEST/$path"
        fi
        printf '%s\0' "$path" >> "$manifest"
        n=$((n + 1))
    done < <("${GIT[@]}" ls-tree -r -z HEAD)
    printf '%s\n%s\n' "$commit" "$("${GIT[@]}" log -1 --format='%ci %s' HEAD)" > "$marker"
    echo "extracted $n files of $commit into $DEST ($skipped missing blobs skipped, see .fidelityquant_missing_blobs)"
fi
[[ -f $DEST/comfyui_version.py ]] && echo "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$DEST/comfyui_version.py")"

# --- 2. shims: a minimal pure-Python torchvision -------------------------------------------------------------
# What ComfyUI imports (comfy/ldm/cascade, cosmos, ace, comfy_extras/nodes_wanmove: `torchvision`,
# `torchvision.transforms[.functional]`, `torchvision.models.*` at call time) and what transformers imports
# once it has found a module named torchvision (it checks find_spec only, then parses `__version__`):
# transformers.image_utils (`InterpolationMode`, `functional.pil_to_tensor`), image_processing_utils
# (`transforms.v2.functional`), video_utils (`io`). diffusers reads the version from package metadata, and the
# stub has no dist-info, so diffusers itself reports torchvision as absent. A few transforms are real; any other
# function name resolves to a placeholder that raises NotImplementedError when called.
SHIMS=$DEST/_shims
TV=$SHIMS/torchvision
rm -rf "$TV"
mkdir -p "$TV/transforms/v2" "$TV/models" "$TV/io"
cat > "$TV/__init__.py" <<'EOF'
"""Minimal pure-Python stand-in for torchvision, written by FidelityQuant's tests/hosts/setup_comfyui.sh.

Enough for ComfyUI to start and for transformers' optional torchvision imports; see _stub.py.
"""
__version__ = "0.28.0+fidelityquant.stub"
from . import io, models, transforms  # noqa: E402,F401  (ComfyUI calls torchvision.models.* after `import torchvision`)
EOF
cat > "$TV/_stub.py" <<'EOF'
import importlib


def placeholder(module, name):
    """Module-level __getattr__ body: a submodule if there is one, else a callable that raises, so that
    `from module import name` still works."""
    if name.startswith("__"):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        pass

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is not available in the pure-Python torchvision stub "
                                  "(FidelityQuant tests/hosts/setup_comfyui.sh)")
    unavailable.__name__ = name
    return unavailable
EOF
cat > "$TV/models/__init__.py" <<'EOF'
from .._stub import placeholder


def __getattr__(name):
    return placeholder(__name__, name)
EOF
cat > "$TV/io/__init__.py" <<'EOF'
from enum import Enum

from .._stub import placeholder


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def __getattr__(name):
    return placeholder(__name__, name)
EOF
cat > "$TV/transforms/__init__.py" <<'EOF'
from enum import Enum

import torch

from . import functional  # noqa: F401


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace=False):
        super().__init__()
        self.mean, self.std, self.inplace = mean, std, inplace

    def forward(self, tensor):
        return functional.normalize(tensor, self.mean, self.std, self.inplace)


class ToTensor:
    def __call__(self, pic):
        return functional.to_tensor(pic)


from . import v2  # noqa: E402,F401


def __getattr__(name):
    from .._stub import placeholder
    return placeholder(__name__, name)
EOF
cat > "$TV/transforms/functional.py" <<'EOF'
import numpy as np
import torch

from .._stub import placeholder

__all__ = ["resize", "normalize", "to_tensor", "pil_to_tensor"]


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    if not isinstance(img, torch.Tensor) or max_size is not None:
        raise NotImplementedError("torchvision stub: resize supports tensors and no max_size only")
    if isinstance(size, int) or len(size) == 1:
        s = size if isinstance(size, int) else size[0]
        h, w = img.shape[-2:]
        size = (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)
    mode = getattr(interpolation, "value", interpolation) or "bilinear"
    if mode not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
        raise NotImplementedError(f"torchvision stub: resize has no {mode!r} mode")
    shape, dtype = img.shape, img.dtype
    x = img.reshape(-1, 1, *shape[-2:])
    x = x if x.is_floating_point() else x.float()
    kw = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": bool(antialias)}
    y = torch.nn.functional.interpolate(x, size=list(size), mode=mode, **kw)
    if y.dtype != dtype:
        y = y.to(dtype) if dtype.is_floating_point else y.round().to(dtype)
    return y.reshape(*shape[:-2], *y.shape[-2:])


def normalize(tensor, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    mean = mean.view(-1, 1, 1) if mean.ndim == 1 else mean
    std = std.view(-1, 1, 1) if std.ndim == 1 else std
    return tensor.sub_(mean).div_(std) if inplace else (tensor - mean) / std


def pil_to_tensor(pic):
    arr = np.array(pic, copy=True)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_tensor(pic):
    t = pic if isinstance(pic, torch.Tensor) else pil_to_tensor(pic)
    return t.float().div(255) if t.dtype == torch.uint8 else t


def __getattr__(name):
    return placeholder(__name__, name)
EOF
cat > "$TV/transforms/v2/__init__.py" <<'EOF'
from .. import Compose, InterpolationMode, Normalize, ToTensor  # noqa: F401
from . import functional  # noqa: F401


def __getattr__(name):
    from ..._stub import placeholder
    return placeholder(__name__, name)
EOF
cat > "$TV/transforms/v2/functional.py" <<'EOF'
from ..functional import *  # noqa: F401,F403
from ..functional import __all__  # noqa: F401


def __getattr__(name):
    from ..._stub import placeholder
    return placeholder(__name__, name)
EOF
echo "torchvision stub written to $TV"

# --- 3. requirements ----------------------------------------------------------------------------------------
# Prints "<where> <requirement>" for every requirement to install (never torch/torchvision/torchaudio):
# where = shims for ComfyUI's own version-pinned data packages (comfyui-*), env for the rest. With
# --requirements FILE: the lines of FILE that are not met. With --deps NAME...: the dependencies of the
# installed distributions NAME... (and theirs) that are missing (what `pip install --no-deps` left out);
# a dependency installed in another version is reported on stderr and left alone (the environment is shared).
unmet() {
    "$PY" - "$SHIMS" "$@" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

shims, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
SKIP = {"torch", "torchvision", "torchaudio", "triton"}


def where(name):  # ComfyUI's front end / templates / docs: one copy per host, in _shims
    return "shims" if canonicalize_name(name).startswith("comfyui-") else "env"


def installed(name):
    path = [shims] if where(name) == "shims" else [p for p in sys.path if p != shims]
    for dist in md.distributions(path=path):
        if canonicalize_name(dist.metadata["Name"] or "") == canonicalize_name(name):
            return dist
    return None


out = []
if mode == "--requirements":
    for line in open(args[0]):
        line = re.sub(r"\s*#.*", "", line).strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if canonicalize_name(req.name) in SKIP or (req.marker and not req.marker.evaluate()):
            continue
        dist = installed(req.name)
        if dist is None or not req.specifier.contains(dist.version, prereleases=True):
            out.append(f"{where(req.name)} {line}")
else:  # --deps: the closure of the given installed distributions
    todo, seen = list(args), set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = installed(name)
        if dist is None:
            continue
        for r in dist.requires or []:
            req = Requirement(r)
            if canonicalize_name(req.name) in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
                continue
            dep = installed(req.name)
            if dep is None:
                out.append(f"{where(req.name)} {req.name}{req.specifier}")
                continue
            if not req.specifier.contains(dep.version, prereleases=True):
                print(f"note: {dist.metadata['Name']} wants {req}, {dep.version} is installed (left alone)",
                      file=sys.stderr)
            todo.append(req.name)
print("\n".join(dict.fromkeys(out)))
EOF
}

install_lines() {  # "<where> <requirement>" lines
    local -a env=() shims=()
    local where req
    while read -r where req; do
        [[ -n ${where:-} ]] || continue
        if [[ $where == shims ]]; then shims+=("$req"); else env+=("$req"); fi
    done <<< "$1"
    if [[ ${#env[@]} -gt 0 ]]; then
        echo "installing into $("$PY" -c 'import sys; print(sys.prefix)'): ${env[*]}"
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${env[@]}"
    fi
    if [[ ${#shims[@]} -gt 0 ]]; then
        echo "installing into $SHIMS: ${shims[*]}"
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$SHIMS" "${shims[@]}"
    fi
}

top=$(sed -e 's/\s*#.*//' -e '/^\s*$/d' -e '/^-/d' "$DEST/requirements.txt" \
      | sed -E 's/^([A-Za-z0-9._-]+).*/\1/' | grep -viE '^(torch|torchvision|torchaudio)$' || true)
changed=0
lines=$(unmet --requirements "$DEST/requirements.txt")
if [[ -n $lines ]]; then install_lines "$lines"; changed=1; fi
# Dependencies, installed --no-deps one level at a time so that pip never pulls a torch/torchvision wheel
# (spandrel, kornia and torchsde depend on torch, spandrel also on torchvision).
for round in 1 2 3 4 5 6 7 8 9; do
    # shellcheck disable=SC2086
    lines=$(unmet --deps $top)
    [[ -n $lines ]] || break
    [[ $round -lt 9 ]] || { echo "dependencies still missing after 8 rounds:"; echo "$lines"; exit 1; }
    install_lines "$lines"; changed=1
done
if [[ $changed == 1 ]]; then echo "requirements installed"; else echo "all requirements already met"; fi

if [[ ${COMFYUI_SETUP_CHECK:-0} == 1 ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "checking: main.py --cpu --quick-test-for-ci"
    (cd "$DEST" && PYTHONPATH="$SHIMS${PYTHONPATH:+:$PYTHONPATH}" "$PY" main.py --cpu --quick-test-for-ci \
        --base-directory "$tmp" --database-url sqlite:///:memory: > "$tmp/log" 2>&1) \
        || { tail -n 40 "$tmp/log"; echo "ComfyUI quick test FAILED" >&2; exit 1; }
    grep -E "IMPORT FAILED|Error" "$tmp/log" || true
    echo "ComfyUI quick test passed"
fi

echo "COMFYUI_PATH=$DEST"
