#!/usr/bin/env bash
# Set up a board as a CA-HFP Edge client: user, virtualenv, torch for the platform, the client,
# its credentials and CA, and the systemd service. Idempotent: run it again after changing
# anything; steps already done are skipped.
#
#   provision-board.sh --bundle DIR/clients/pi-01 --platform pi --source /path/to/cahfp-edge
#
# Options:
#   --bundle DIR       the board's bundle from `cahfp deploy init` (credentials, client.env, ca.crt;
#                      client.crt and client.key with --client-certs)
#   --platform P       pi (Raspberry Pi OS 64-bit), jetson (JetPack), x86
#   --source S         what to pip-install: a checkout of this repository or a wheel
#   --data SPEC        the board's data (default imagefolder:/var/lib/cahfp/data)
#   --inference-only   no torch, no training service: onnxruntime + numpy + Pillow for
#                      `cahfp infer` only
#   --torch-wheel W    Jetson: NVIDIA's PyTorch wheel for this JetPack (file or URL)
#   --root DIR         install into DIR instead of / (for images and tests)
#   --skip-install     do not create the virtualenv or install packages
#   --dry-run          print what would be done, change nothing
set -euo pipefail

BUNDLE="" PLATFORM="" SOURCE="" DATA="imagefolder:/var/lib/cahfp/data" INFERENCE_ONLY=0
TORCH_WHEEL="" ROOT="/" SKIP_INSTALL=0 DRY_RUN=0
TORCH_VERSION="${CAHFP_TORCH_VERSION:-2.14.1}"

usage() { sed -n '2,19p' "$0"; exit 2; }
die() { echo "provision: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE="$2"; shift 2 ;;
    --platform) PLATFORM="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --inference-only) INFERENCE_ONLY=1; shift ;;
    --torch-wheel) TORCH_WHEEL="$2"; shift 2 ;;
    --root) ROOT="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    *) die "unknown option $1" ;;
  esac
done

[ -n "$BUNDLE" ] || die "--bundle is required"
if [ ! -f "$BUNDLE/client.env" ] || [ ! -f "$BUNDLE/ca.crt" ]; then
  die "$BUNDLE is not a client bundle (client.env, ca.crt)"
fi
case "$PLATFORM" in pi|jetson|x86) ;; *) die "--platform must be pi, jetson or x86" ;; esac
if [ "$SKIP_INSTALL" -eq 0 ] && [ -z "$SOURCE" ]; then die "--source is required (or --skip-install)"; fi
if [ "$PLATFORM" = jetson ] && [ "$INFERENCE_ONLY" -eq 0 ] && [ "$SKIP_INSTALL" -eq 0 ] && [ -z "$TORCH_WHEEL" ]; then
  die "Jetson needs NVIDIA's PyTorch wheel for its JetPack release: --torch-wheel FILE_OR_URL (see docs/deploy.md)"
fi

ROOT="${ROOT%/}"
PREFIX="$ROOT/opt/cahfp"
ETC="$ROOT/etc/cahfp"
STATE="$ROOT/var/lib/cahfp"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV="$PREFIX/venv"
HERE="$(cd "$(dirname "$0")" && pwd)"
UNIT_SRC="$HERE/../systemd/cahfp-client.service"

run() {
  if [ "$DRY_RUN" -eq 1 ]; then echo "would run: $*"; else "$@"; fi
}
step() { echo "== $*"; }
done_already() { echo "   already done: $*"; }

# shellcheck disable=SC1091
CLIENT_ID="$(. "$BUNDLE/client.env" && echo "${CAHFP_MQTT_USERNAME:?}")"

step "user cahfp"
if grep -q '^cahfp:' "$ROOT/etc/passwd" 2>/dev/null; then
  done_already "user cahfp exists"
else
  if [ "$ROOT" = "" ]; then
    run useradd --system --user-group --home-dir /var/lib/cahfp --shell /usr/sbin/nologin cahfp
  else
    run useradd --root "$ROOT" --system --user-group --home-dir /var/lib/cahfp \
      --shell /usr/sbin/nologin cahfp
  fi
fi
# ids from the target's own user database (names would resolve against this host's)
CAHFP_UID="$(awk -F: '$1=="cahfp"{print $3}' "$ROOT/etc/passwd" 2>/dev/null || true)"
CAHFP_GID="$(awk -F: '$1=="cahfp"{print $3}' "$ROOT/etc/group" 2>/dev/null || true)"

step "directories"
for d in "$PREFIX" "$ETC" "$STATE" "$STATE/data" "$STATE/model"; do
  if [ -d "$d" ]; then done_already "$d"; else run mkdir -p "$d"; fi
done
run chmod 0750 "$ETC" "$STATE"
if [ -n "$CAHFP_UID" ] && [ -n "$CAHFP_GID" ]; then
  run chown -R "$CAHFP_UID:$CAHFP_GID" "$STATE"
  run chown "0:$CAHFP_GID" "$ETC"
fi

if [ "$SKIP_INSTALL" -eq 0 ]; then
  step "virtualenv and packages ($PLATFORM$([ "$INFERENCE_ONLY" -eq 1 ] && echo ', inference only'))"
  if [ -x "$VENV/bin/python" ]; then done_already "$VENV"; else run python3 -m venv "$VENV"; fi
  PIP="$VENV/bin/python -m pip install --quiet"
  # the project's pinned versions, where the source is a checkout that has them
  if [ -f "$SOURCE/constraints.txt" ]; then PIP="$PIP -c $SOURCE/constraints.txt"; fi
  if [ "$INFERENCE_ONLY" -eq 1 ]; then
    # `cahfp infer` imports only onnxruntime, numpy and Pillow
    run $PIP onnxruntime numpy pillow
    run $PIP --no-deps "$SOURCE"
  else
    case "$PLATFORM" in
      pi|x86) run $PIP "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu ;;
      jetson) run $PIP "$TORCH_WHEEL" ;;
    esac
    run $PIP "$SOURCE"
  fi
fi

step "credentials and CA"
if [ "$DRY_RUN" -eq 0 ]; then
  install -m 0644 "$BUNDLE/ca.crt" "$ETC/ca.crt"
  tmp="$(mktemp)"
  {
    grep -v -e '^CAHFP_CA=' -e '^CAHFP_CERT=' -e '^CAHFP_KEY=' "$BUNDLE/client.env"
    echo "CAHFP_CA=/etc/cahfp/ca.crt"
    if [ -f "$BUNDLE/client.crt" ]; then
      echo "CAHFP_CERT=/etc/cahfp/client.crt"
      echo "CAHFP_KEY=/etc/cahfp/client.key"
    fi
    echo "CAHFP_CLIENT_ID=$CLIENT_ID"
    echo "CAHFP_DATA=$DATA"
  } > "$tmp"
  install -m 0640 "$tmp" "$ETC/client.env"
  rm -f "$tmp"
  if [ -f "$BUNDLE/client.crt" ]; then
    install -m 0644 "$BUNDLE/client.crt" "$ETC/client.crt"
    install -m 0640 "$BUNDLE/client.key" "$ETC/client.key"
    # the service runs as cahfp: it reads the key through the group
    if [ -n "$CAHFP_GID" ]; then chown "0:$CAHFP_GID" "$ETC/client.crt" "$ETC/client.key"; fi
  else
    rm -f "$ETC/client.crt" "$ETC/client.key"  # a bundle without certificate: none left over
  fi
  if [ -n "$CAHFP_GID" ]; then
    chown "0:$CAHFP_GID" "$ETC/client.env" "$ETC/ca.crt"
  fi
else
  echo "would install $ETC/ca.crt and $ETC/client.env (0640) for client $CLIENT_ID"
  if [ -f "$BUNDLE/client.crt" ]; then
    echo "would install $ETC/client.crt and $ETC/client.key (0640, group cahfp)"
  fi
fi

if [ "$INFERENCE_ONLY" -eq 1 ]; then
  step "no training service on an inference-only board"
else
  step "systemd service"
  if [ -f "$UNIT_DIR/cahfp-client.service" ] && cmp -s "$UNIT_SRC" "$UNIT_DIR/cahfp-client.service"; then
    done_already "cahfp-client.service installed"
  else
    run mkdir -p "$UNIT_DIR"
    run install -m 0644 "$UNIT_SRC" "$UNIT_DIR/cahfp-client.service"
  fi
  if [ "$ROOT" = "" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable --now cahfp-client.service
  else
    echo "   not the running system: enable with 'systemctl enable --now cahfp-client' on the board"
  fi
fi
echo "provisioned $CLIENT_ID ($PLATFORM) under ${ROOT:-/}"
