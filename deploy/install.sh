#!/bin/sh
# Install cabin-monitor the way a vehicle runs it (see deploy/README.md):
#   /opt/cabin-monitor/venv                         the daemon, in its own virtual environment
#   /usr/lib/systemd/system/cabin-monitor.service   the unit
#   /usr/lib/sysusers.d/, /usr/lib/tmpfiles.d/      its user and folders, made at boot
#   /etc/cabin-monitor/cabin-monitor.yaml           the configuration (never overwritten)
# With --destdir everything goes below DIR (an image's root file system) and nothing
# on this machine is touched. The venv is built where it will run, DIR only being a
# prefix: run this with the Python of the image (inside its chroot, or on a machine of
# the same distribution, architecture and Python version).
set -eu
umask 022  # the daemon's user must read the venv, whatever umask root has

PREFIX=/opt/cabin-monitor
VENV=$PREFIX/venv
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
PYTHON=${PYTHON:-python3}

usage() {
    cat <<EOF
usage: deploy/install.sh [--destdir DIR] [--extra cpu|gpu] [--extras LIST] [--record] [--wheel PATH | --source DIR]
                         [--bridge URL --vehicle-id ID]

  --destdir DIR   install below DIR (an image root); default: this machine, as root
  --extra NAME    onnxruntime build: cpu (default) or gpu (onnxruntime-gpu: CUDA/TensorRT)
  --extras LIST   also install these extras of the package, comma-separated, e.g. metrics,record
                  (metrics: prometheus-client for metrics.enabled; record: pyarrow for record.dir)
  --record        the same as --extras record
  --wheel PATH    install this cabin-monitor wheel
  --source DIR    build cabin-monitor from this source tree (default: $REPO)
  --bridge URL    bridge the vehicle's local Mosquitto to the fleet broker at URL
                  (mqtts://host:port): /etc/mosquitto/conf.d/cabin-fleet-bridge.conf,
                  logging in with /etc/mosquitto/certs/ID.crt and ID.key (CA: ca.crt)
  --vehicle-id ID the vehicle's id (its certificate's CN), needed with --bridge

The unit, sysusers.d/tmpfiles.d files and example config come from the checkout
this script is in. Environment: PYTHON (default python3) makes the venv; PIP_*
variables reach pip (e.g. PIP_FIND_LINKS=DIR for an onnxruntime-gpu wheel for Jetson).
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 2
}

destdir=${DESTDIR:-}
extra=cpu
extras=
wheel=
source=
bridge=
vehicle_id=
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --record) extras=$extras,record; shift ;;
        --destdir | --extra | --extras | --wheel | --source | --bridge | --vehicle-id)
            if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi
            case $1 in
                --destdir) destdir=$2 ;;
                --extra) extra=$2 ;;
                --extras) extras=$extras,$2 ;;
                --wheel) wheel=$2 ;;
                --source) source=$2 ;;
                --bridge) bridge=$2 ;;
                --vehicle-id) vehicle_id=$2 ;;
            esac
            shift 2
            ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

case $extra in
    cpu | gpu) ;;
    *) die "--extra must be cpu or gpu, not '$extra'" ;;
esac
set -f  # the names are split on commas, never expanded as file patterns
old_ifs=$IFS
IFS=,
for name in $extras; do
    case $name in
        cpu | gpu) die "--extras: give the onnxruntime build with --extra $name" ;;
        *[!a-z0-9_-]*) die "--extras: not an extra name: '$name'" ;;
    esac
done
IFS=$old_ifs
set +f
[ -z "$wheel" ] || [ -z "$source" ] || die "give --wheel or --source, not both"
[ -z "$bridge" ] || [ -n "$vehicle_id" ] || die "--bridge needs --vehicle-id ID"
if [ -n "$wheel" ]; then
    case $wheel in *.whl) ;; *) die "--wheel wants a .whl file: $wheel" ;; esac
    [ -f "$wheel" ] || die "no such wheel: $wheel"
    wheel=$(cd "$(dirname "$wheel")" && pwd -P)/$(basename "$wheel")
else
    source=${source:-$REPO}
    [ -f "$source/pyproject.toml" ] || die "not a cabin-monitor source tree (no pyproject.toml): $source"
    source=$(cd "$source" && pwd -P)
fi
if [ -n "$destdir" ]; then
    mkdir -p "$destdir"
    destdir=$(cd "$destdir" && pwd -P)
    [ "$destdir" != / ] || destdir=
fi
[ -n "$destdir" ] || [ "$(id -u)" = 0 ] || die "installing on this machine needs root; or give --destdir DIR"
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON on PATH (set PYTHON=...)"

# 1. The venv. pip writes the path it runs from into every script it installs
# (#!$destdir/opt/...) and the venv into pyvenv.cfg and bin/activate*; those are
# rewritten to the final path, and the byte code is compiled as if it lay there.
# It is built next to the running one and swapped in at the end, so a failed
# build leaves the installed version alone; the one it replaces stays as
# venv.previous (roll back by swapping the two).
root_venv=$destdir$VENV
build=$root_venv.new
rm -rf "$build"
work=$(mktemp -d)
trap 'rm -rf "$work" "$build"' EXIT  # $build is gone once swapped in; after a failure it is removed
trap 'exit 130' INT TERM HUP
mkdir -p "$destdir$PREFIX"
# Each extra once, in the order given.
extras=$(printf '%s\n' "$extras" | tr ',' '\n' | awk 'NF && !seen[$0]++ { printf ",%s", $0 }')
echo "venv: $root_venv (cabin-monitor[$extra$extras], $("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$build"
if [ -n "$wheel" ]; then
    requirement="${wheel}[$extra$extras]"
else
    # From a clean copy of the tree: setuptools packs whatever is in an old build/
    # folder, modules since deleted included.
    mkdir "$work/src"
    if git -C "$source" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$source" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
            | tar -C "$work/src" -xf -
    else
        tar -C "$source" --exclude=./build --exclude=./dist --exclude=./.venv --exclude='*.egg-info' -cf - . \
            | tar -C "$work/src" -xf -
    fi
    requirement="$work/src[$extra$extras]"
fi
"$build/bin/python" -m pip install --quiet --no-compile "$requirement"
# pip only warns about an extra the package does not have.
unknown=$("$build/bin/python" - "$extras" <<'PY'
import sys
from importlib.metadata import metadata

known = set(metadata("cabin-monitor").get_all("Provides-Extra") or [])
print(" ".join(name for name in sys.argv[1].split(",") if name and name not in known))
PY
)
[ -z "$unknown" ] || die "--extras: cabin-monitor has no extra $unknown; the installed venv is unchanged"

for file in "$build"/bin/* "$build/pyvenv.cfg"; do
    if [ -f "$file" ] && [ ! -L "$file" ] && grep -qF "$build" "$file"; then
        # $build is an absolute path: escape what sed would read as a pattern.
        pattern=$(printf '%s\n' "$build" | sed 's/[][\.*^$|]/\\&/g')
        sed -i "s|$pattern|$VENV|g" "$file"
    fi
done
# venv's own pip/setuptools came with byte code naming $build: compile all again.
# checked-hash: valid whatever the file times (image tools often reset them), and
# /opt is read-only for the daemon. Errors are left out: mediapipe ships a test
# file that does not compile, which nothing imports.
find "$build/lib" -name __pycache__ -type d -prune -exec rm -rf {} +
"$build/bin/python" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$build" -p "$VENV" "$build/lib" \
    >/dev/null || true
left=$(grep -rlF "$build" "$build" | head -n 5)
[ -z "$left" ] || die "files in the venv still name the build path $build, e.g. $left"

# 2. Unit, user, folders, configuration.
install -d "$destdir/usr/lib/systemd/system" "$destdir/usr/lib/sysusers.d" "$destdir/usr/lib/tmpfiles.d"
install -m 0644 "$REPO/systemd/cabin-monitor.service" "$destdir/usr/lib/systemd/system/cabin-monitor.service"
install -m 0644 "$REPO/deploy/sysusers.d/cabin-monitor.conf" "$destdir/usr/lib/sysusers.d/cabin-monitor.conf"
install -m 0644 "$REPO/deploy/tmpfiles.d/cabin-monitor.conf" "$destdir/usr/lib/tmpfiles.d/cabin-monitor.conf"
# The group cabin-monitor may not exist yet: tmpfiles.d sets it at boot.
install -d -m 0750 "$destdir/etc/cabin-monitor"
config=$destdir/etc/cabin-monitor/cabin-monitor.yaml
if [ -e "$config" ]; then
    echo "config: kept $config"
else
    install -m 0640 "$REPO/deploy/cabin-monitor.example.yaml" "$config"
    echo "config: $config (the annotated example: set vehicle_id, camera, mqtt)"
fi
# The configuration must load with the new version before it replaces the old.
"$build/bin/python" -m cabin_monitor check-config "$config" \
    || die "$config does not load with this version (problems above); the installed venv is unchanged"

if [ -n "$bridge" ]; then
    certs=/etc/mosquitto/certs
    install -d "$destdir/etc/mosquitto/conf.d"
    sh "$REPO/deploy/mosquitto/bridge.sh" --fleet "$bridge" --vehicle-id "$vehicle_id" \
        --ca "$certs/ca.crt" --cert "$certs/$vehicle_id.crt" --key "$certs/$vehicle_id.key" \
        >"$work/bridge.conf" || die "cannot write the bridge configuration (see above)"
    install -m 0644 "$work/bridge.conf" "$destdir/etc/mosquitto/conf.d/cabin-fleet-bridge.conf"
    echo "bridge: $destdir/etc/mosquitto/conf.d/cabin-fleet-bridge.conf (to $bridge as $vehicle_id;" \
        "put ca.crt, $vehicle_id.crt and $vehicle_id.key in $certs)"
fi

if [ -d "$root_venv" ]; then
    rm -rf "$root_venv.previous"
    mv "$root_venv" "$root_venv.previous"
fi
mv "$build" "$root_venv"
echo "unit: $destdir/usr/lib/systemd/system/cabin-monitor.service"

# 3. This machine only: what first boot does for an image.
if [ -n "$destdir" ]; then
    echo "done. At first boot systemd-sysusers and systemd-tmpfiles create the user and folders;"
    echo "enable the unit in the image with: systemctl --root=$destdir enable cabin-monitor.service"
    exit 0
fi
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo "running systemd-sysusers (user cabin-monitor)"
    systemd-sysusers /usr/lib/sysusers.d/cabin-monitor.conf
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    echo "running systemd-tmpfiles --create (folders, config mode)"
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/cabin-monitor.conf
fi
if [ -e /etc/systemd/system/cabin-monitor.service ]; then
    echo "install.sh: warning: /etc/systemd/system/cabin-monitor.service (an earlier manual install)" \
        "overrides the unit installed now; remove it unless that is meant" >&2
fi
if [ -d /run/systemd/system ]; then
    echo "running systemctl daemon-reload"
    systemctl daemon-reload
fi
echo "done. Start with: systemctl enable --now cabin-monitor (after an update: systemctl restart cabin-monitor)"
