#!/usr/bin/env bash
# Installs IOTA into ./.venv. Idempotent: a re-run with nothing changed returns in about a second.
#
#   ./setup.sh [--role dev|miner|validator|orchestrator] [--cpu|--cuda] [--quiet]
#
# Roles: `dev` (the default, and what CI uses) adds the test tools; the daemon roles install the runtime
# only and create .env from .env.example if it is missing. Torch: a CUDA build where `nvidia-smi` sees a
# GPU, a CPU build otherwise; --cpu/--cuda override the detection. TORCH_INDEX_URL, if set, is passed to
# pip as the index for torch alone (for example a CPU-only wheel index on a machine without one on disk).
set -euo pipefail
cd "$(dirname "$0")"

role=dev
torch_flavor=auto
quiet=0
while [ $# -gt 0 ]; do
  case "$1" in
    --role) role="${2:?--role needs a value}"; shift 2 ;;
    --role=*) role="${1#--role=}"; shift ;;
    --cpu) torch_flavor=cpu; shift ;;
    --cuda) torch_flavor=cuda; shift ;;
    --quiet|-q) quiet=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$role" in dev|miner|validator|orchestrator) ;; *)
  echo "setup.sh: --role must be dev, miner, validator or orchestrator, not '$role'" >&2; exit 2 ;;
esac

say() { [ "$quiet" = 1 ] || echo "setup: $*"; }

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup.sh: Python 3.11 or newer is required ('$python' is $("$python" --version 2>&1 || echo missing))." >&2
  echo "          Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi

if [ "$torch_flavor" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then torch_flavor=cuda; else torch_flavor=cpu; fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
py=.venv/bin/python
log=.venv/setup.log
# Quiet: pip's output goes to .venv/setup.log and is shown only if pip fails.
pip_install() {
  if [ "$quiet" = 1 ]; then
    "$py" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1 || { tail -n 40 "$log" >&2; return 1; }
  else
    "$py" -m pip install --disable-pip-version-check "$@"
  fi
}

# uv resolves and installs in seconds where pip takes minutes (the dev install on our 2-core machines: 17 s
# against 164 s; torch from the file on disk: 14 s against 90 s). pip stays the fallback wherever uv cannot
# be installed, and installs torch wherever uv would not find the same build pip finds. --compile-bytecode,
# as pip does: otherwise every process that starts first after set-up compiles torch's modules itself, and
# a network's processes starting together each compile them at once.
have_uv=""
ensure_uv() {
  if [ -z "$have_uv" ]; then
    if "$py" -m uv --version >/dev/null 2>&1 || pip_install -q uv; then have_uv=yes; else have_uv=no; fi
  fi
  [ "$have_uv" = yes ]
}
uv_install() {
  if [ "$quiet" = 1 ]; then
    "$py" -m uv pip install --python "$py" --compile-bytecode "$@" >"$log" 2>&1 || { tail -n 40 "$log" >&2; return 1; }
  else
    "$py" -m uv pip install --python "$py" --compile-bytecode "$@"
  fi
}
fast_install() { if ensure_uv; then uv_install "$@"; else pip_install "$@"; fi; }
# The folder pip's configuration names for local wheels (find-links), where this machine keeps torch's build.
wheel_dir="${PIP_FIND_LINKS:-$("$py" -m pip config get global.find-links 2>/dev/null || true)}"

# Torch first, so that the project's own `torch>=` range is already satisfied and pip keeps this build.
# torch's version file, read without importing torch (seconds), so that an up-to-date setup stays fast.
torch_version() {
  "$py" -c 'import importlib.util as u, pathlib as p, sys; s = u.find_spec("torch"); v = {}
exec(p.Path(s.origin).with_name("version.py").read_text(), v); print(v[sys.argv[1]] or "")' "$1" 2>/dev/null
}
have_torch=$(cuda=$(torch_version cuda) && { [ -n "$cuda" ] && echo cuda || echo cpu; } || true)
if [ "$have_torch" != "$torch_flavor" ] && ! { [ "$torch_flavor" = cpu ] && [ -n "$have_torch" ]; }; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=( --index-url "$TORCH_INDEX_URL" )
  if [ "$torch_flavor" = cuda ]; then
    say "installing a CUDA build of torch"
    pip_install ${index[@]+"${index[@]}"} "torch>=2.5"
  else
    say "installing a CPU build of torch"
    if [ -z "${TORCH_INDEX_URL:-}" ] && [ -d "$wheel_dir" ] && compgen -G "$wheel_dir/torch-2.13.0*.whl" >/dev/null \
        && ensure_uv; then
      uv_install --find-links "$wheel_dir" "torch==2.13.0"
    else
      pip_install ${index[@]+"${index[@]}"} "torch==2.13.0"
    fi
  fi
fi

dev_extras="[dev,hf,bench]"
extras=""
# dev includes the hf extra so that the tests exercise the Hugging Face corpus (offline, on local files).
[ "$role" = dev ] && extras="$dev_extras"
stamp=".venv/.iota-installed-$role"
# The stamp is keyed on the extras too, so that changing what a role installs re-runs pip.
stamp_of() { printf '%s\n' "$1" | cat pyproject.toml - | sha256sum | cut -c1-16; }
want="$(stamp_of "$extras")"
# The dev install is a superset of every daemon role's: a current dev stamp satisfies them too.
dev_current() {
  [ -f .venv/.iota-installed-dev ] && [ "$(cat .venv/.iota-installed-dev)" = "$(stamp_of "$dev_extras")" ]
}
if [ "$role" != dev ] && dev_current; then
  say "iota$dev_extras (a superset of the $role's needs) is up to date"
elif [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing iota$extras and its dependencies"
  fast_install -e ".$extras"
  echo "$want" > "$stamp"
else
  say "iota$extras is up to date"
fi

# The dashboard's browser test (tests/test_dashboard.py) drives Debian's chromium. Install it where we can;
# never fail setup over it.
if [ "$role" = dev ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing chromium for the dashboard's browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >.venv/apt.log 2>&1; then
      echo "setup: could not install chromium (see .venv/apt.log); the browser test will fail under CI" >&2
    fi
  else
    echo "setup: chromium is missing (apt-get install chromium, as root); the browser test will fail under CI" >&2
  fi
fi

# The PM2 test (tests/test_pm2_e2e.py) runs the process files in pm2/ under a real PM2: a pinned one, in
# .venv/node rather than on the PATH, so that it is the same everywhere and never an operator's own. Its
# version is read from its package.json: running `pm2` would start a daemon. Never fail setup over it.
pm2_version=7.0.4
if [ "$role" = dev ] && [ "$(node -p 'require("./.venv/node/node_modules/pm2/package.json").version' 2>/dev/null \
    || true)" != "$pm2_version" ]; then
  if command -v npm >/dev/null 2>&1; then
    say "installing PM2 $pm2_version into .venv/node for the PM2 test"
    if ! npm install --prefix .venv/node --no-audit --no-fund --loglevel=error "pm2@$pm2_version" \
        >.venv/npm.log 2>&1; then
      echo "setup: could not install PM2 (see .venv/npm.log); the PM2 test will fail under CI" >&2
    fi
  else
    echo "setup: npm (which comes with node) is missing; the PM2 test will fail under CI" >&2
  fi
fi

env_file="${IOTA_ENV_FILE:-.env}"
if [ "$role" != dev ] && [ ! -f "$env_file" ]; then
  cp .env.example "$env_file"
  say "created $env_file from .env.example: edit it before starting the $role"
fi
say "done ($role, torch $(torch_version __version__))"
