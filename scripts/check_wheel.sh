#!/usr/bin/env bash
# Install camseg like a library and run it: build the wheel, install it into a fresh venv
# outside the checkout, then from an empty folder run `camseg debug=fast` and `camseg-predict`
# on that run's segmenter.
#
#   scripts/check_wheel.sh [VENV]      (make check-wheel; CI runs it after make test)
#
# The heavy dependencies (torch, Lightning, ...) are not installed again: a .pth file puts
# VENV's site-packages (default .venv) after the fresh venv's own, and only the wheel is
# installed (--no-deps). VENV's editable camseg is not seen: a directory listed in a .pth
# file is added to sys.path but its own .pth files are not run. The optional packages of the
# extras dicom, nifti and tensorboard are hidden, as in a base install.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEPS_VENV=$(cd "${1:-.venv}" && pwd)
PY=$DEPS_VENV/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/camseg-wheel.XXXXXX")
trap 'rm -rf "$WORK" "$REPO/build"' EXIT
t0=$SECONDS
step() { echo "check_wheel [$((SECONDS - t0)) s]: $*"; }

step "building the wheel"
rm -rf build
# No build isolation (no download) when VENV has the setuptools pyproject.toml asks for.
ISOLATION=--no-build-isolation
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
  2>/dev/null || ISOLATION=
"$PY" -m pip wheel -q --no-deps $ISOLATION -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/camseg-*.whl)
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for need in ("camseg/conf/__init__.py", "camseg/conf/config.yaml", "camseg/conf/experiment/synthetic.yaml"):
    assert need in names, f"{sys.argv[1]}: {need} missing"
print(f"  {sys.argv[1].rsplit('/', 1)[-1]}: {sum(n.startswith('camseg/conf/') for n in names)} files under camseg/conf")
PYEOF

step "installing it into a fresh venv"
"$PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/camseg_ci_deps.pth"
echo 'import sys; sys.modules.update(dict.fromkeys(["pydicom", "nibabel", "tensorboard"]))' \
  > "$SITE/camseg_ci_base_install.pth"
# --ignore-installed: VENV's own (editable) camseg is visible through the .pth; leave it alone.
"$PY" -m pip --python "$VPY" install -q --no-deps --ignore-installed "$WHEEL"

mkdir "$WORK/user" && cd "$WORK/user"
env -u CAMSEG_CONF_DIR -u PYTHONPATH "$VPY" - "$WORK/venv" <<'PYEOF'
import sys
import camseg
from camseg.app import conf_dir
assert camseg.__file__.startswith(sys.argv[1]), f"camseg imported from {camseg.__file__}, not the wheel"
assert conf_dir() == "pkg://camseg.conf", conf_dir()
print(f"  camseg {camseg.__version__} from {camseg.__file__}; config {conf_dir()}")
PYEOF

step "camseg debug=fast (in $WORK/user)"
env -u CAMSEG_CONF_DIR -u PYTHONPATH "$WORK/venv/bin/camseg" debug=fast run_name=wheel logger=default
test -f runs/wheel/seg/checkpoints/best.ckpt
test -d data && test -d runs/wheel/hydra  # Hydra's run log lives in the run directory
test ! -e "$SITE/runs" && test ! -e "$SITE/data"

step "camseg-predict"
IMAGES=$(ls -d data/*/images | head -n 1)
env -u CAMSEG_CONF_DIR -u PYTHONPATH "$WORK/venv/bin/camseg-predict" \
  ckpt=runs/wheel/seg/checkpoints/best.ckpt input="$IMAGES" output=predictions overlays=false
test -n "$(ls predictions/masks)"

step "ok: the installed wheel runs camseg and camseg-predict"
