#!/bin/sh
# Builds token-proxy's virtualenv at $1 from the source tree in the current directory,
# with the data path compiled by mypyc (see setup.py). The container image's build
# stage runs this; tests/test_deploy.py runs it too, into a temporary directory.
#
# Needs python3.11 with venv and pip, a C compiler and the Python headers. The
# virtualenv it makes carries no pip, and nothing of the compiler's environment.
set -eu
target=$1
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The compiler's environment: mypy (mypyc), setuptools, and every dependency, since
# mypyc type-checks the compiled modules against them.
"$python" -m venv "$work/compiler"
"$work/compiler/bin/pip" install --quiet --disable-pip-version-check \
    "setuptools>=77" "mypy==2.4.1" "types-PyYAML==6.0.12.20261113" ".[speed]"
TOKEN_PROXY_COMPILE=1 "$work/compiler/bin/pip" wheel --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps --wheel-dir "$work/wheels" .

"$python" -m venv --without-pip "$target"
for wheel in "$work"/wheels/token_proxy-*.whl; do
    "$python" -m pip --python "$target/bin/python" install --quiet \
        --disable-pip-version-check "$wheel[speed]"
done
"$target/bin/python" -I -c 'import proxy, sys; sys.exit(proxy.data_path_build() != "compiled")'
