#!/usr/bin/env bash
# Install llama-cpp-python (the engine `hf-posenc export --target llama.cpp --verify` runs) into a venv.
# PyPI ships it as a source distribution whose full build (server, multimodal, common) takes ~8 minutes on
# 2 cores; only libllama is needed, so it is built once with cmake (~2 minutes) into a cache folder that
# later venvs and runs reuse, and the Python package is installed without compiling.
# Usage: scripts/install_llama_cpp.sh VENV | --build-only   (cache: $HF_POSENC_BUILD_CACHE, default .cache/)
# --build-only fills the cache (CI starts it in the background while the venvs install); a concurrent
# install waits for it on the cache's lock.
set -euo pipefail
VENV=${1:?usage: scripts/install_llama_cpp.sh VENV | --build-only}
VERSION=0.3.36
CACHE=$(realpath -m "${HF_POSENC_BUILD_CACHE:-.cache}/llama-cpp-python-$VERSION")
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
PIP="$VENV/bin/pip install -q --disable-pip-version-check"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ ! -f "$CACHE/lib/libllama.so" ]; then
  mkdir -p "$CACHE/src"
  [ -f "$SDIST" ] || python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$CACHE"
  tar xzf "$SDIST" -C "$CACHE/src" --strip-components=1
  cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' >"$CACHE/cmake.log"
  cmake --build "$CACHE/build" --target llama -j"$(nproc)" >>"$CACHE/cmake.log"
  mkdir -p "$CACHE/lib"
  cp -P "$CACHE"/build/bin/lib*.so* "$CACHE/lib/"
fi
flock -u 9
[ "$VENV" = "--build-only" ] && exit 0
$PIP numpy typing-extensions diskcache jinja2
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PIP --no-deps "$SDIST"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SITE/llama_cpp/lib"
cp -P "$CACHE"/lib/lib*.so* "$SITE/llama_cpp/lib/"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready in $VENV')"
