# What a host must be, for both install scripts (sourced, not run). The caller sets PROG.
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
