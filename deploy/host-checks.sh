# What a host must be, and where things are, for both install scripts (sourced, not run).
# The caller sets PROG.
# SIDETUNE_OS_RELEASE and SIDETUNE_ARCH stand in for /etc/os-release and `uname -m` (tests).

die() { echo "$PROG: $*" >&2; exit 1; }

# check_os: Debian, Ubuntu, or a derivative (Raspberry Pi OS, JetPack's Ubuntu).
check_os() {
  local release=${SIDETUNE_OS_RELEASE:-/etc/os-release} os_id
  [ -r "$release" ] || die "cannot read $release: this installer supports Debian and Ubuntu and their derivatives"
  os_id=$(. "$release"; echo "${ID:-} ${ID_LIKE:-}")
  case " $os_id " in
    *" debian "*|*" ubuntu "*) ;;
    *) die "unsupported OS '$os_id' ($release): this installer supports Debian and Ubuntu and their derivatives" ;;
  esac
}

# check_arch WHAT ARCH...: this machine's architecture is one of ARCH.
check_arch() {
  local what=$1 arch=${SIDETUNE_ARCH:-$(uname -m)} all
  shift
  all="$*"
  case " $all " in
    *" $arch "*) ;;
    *) local head=${all% *}; die "unsupported architecture $arch: $what needs ${head// /, } or ${all##* }" ;;
  esac
}

# check_python PYTHON: Python 3.10 or newer.
check_python() {
  local v
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && return 0
  v=$("$1" -V 2>&1) || v="missing"
  die "$1 is $v: sidetune needs Python 3.10 or newer"
}

# resolve_paths MARKER: SRC (the source folder, which holds MARKER) and ROOT (--root, if any)
# made absolute; without --root the script must run as root.
resolve_paths() {
  [ -n "$SRC" ] || usage
  SRC=$(cd "$SRC" && pwd) || die "no source folder $SRC"
  [ -f "$SRC/pyproject.toml" ] && [ -e "$SRC/$1" ] || die "$SRC is not the sidetune source folder"
  if [ -n "$ROOT" ]; then mkdir -p "$ROOT"; ROOT=$(cd "$ROOT" && pwd); fi
  if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then die "run as root (or with --root DIR)"; fi
}
