# Shared by scripts/test and scripts/bench: make sure the programs the
# project needs are installed, with apt-get when we are root on Debian,
# otherwise say what to install.

apt_updated=0

# apt_install PACKAGE...: installs Debian packages when possible.
apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "missing: install the Debian package(s) $* (e.g. sudo apt-get install -y $*)" >&2
        return 1
    fi
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# A C compiler and make, for the jemalloc allocator the binary is built
# with by default (tikv-jemalloc-sys builds jemalloc from source).
ensure_c_build() {
    if command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1; then
        return 0
    fi
    echo "a C compiler or make not found; installing gcc and make" >&2
    apt_install gcc make libc6-dev && command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1
}

# PostgreSQL server binaries: `postgres` and `initdb` on PATH or in
# /usr/lib/postgresql/*/bin (where Debian puts them).
have_postgres() {
    if command -v postgres >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        return 0
    fi
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

ensure_postgres() {
    if have_postgres; then
        return 0
    fi
    echo "PostgreSQL server binaries not found; installing postgresql" >&2
    apt_install postgresql && have_postgres
}

# promtool and the Prometheus server, from Debian's prometheus package
# (installing it starts no service here; the tests run their own).
have_prometheus() {
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
}

ensure_promtool() {
    if have_prometheus; then
        return 0
    fi
    echo "promtool/prometheus not found; installing prometheus" >&2
    apt_install prometheus && have_prometheus
}

# cargo-audit (`cargo audit`), built from crates.io into cargo's bin folder
# (~/.cargo/bin), so that later runs find it and build nothing.
ensure_cargo_audit() {
    if cargo audit --version >/dev/null 2>&1; then
        return 0
    fi
    echo "cargo-audit not found; installing it (cargo install --locked cargo-audit)" >&2
    cargo install --locked cargo-audit && cargo audit --version >/dev/null
}

# schemathesis, pinned, in a virtualenv under target/ (no global install),
# for scripts/fuzz.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=target/schemathesis

ensure_schemathesis() {
    local st="$SCHEMATHESIS_VENV/bin/schemathesis"
    if [ -x "$st" ] && "$st" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "python3 not found; installing python3 and python3-venv" >&2
        apt_install python3 python3-venv
    fi
    rm -rf "$SCHEMATHESIS_VENV"
    if ! python3 -m venv "$SCHEMATHESIS_VENV" 2>/dev/null; then
        echo "python3 cannot make a virtualenv; installing python3-venv" >&2
        apt_install python3-venv
        rm -rf "$SCHEMATHESIS_VENV"
        python3 -m venv "$SCHEMATHESIS_VENV"
    fi
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV" >&2
    "$SCHEMATHESIS_VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    "$st" --version >/dev/null
}
