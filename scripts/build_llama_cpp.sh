#!/usr/bin/env bash
# llama.cpp, compiled once for both of its users: the Python binding (llama-cpp-python) and the C++ tools
# (llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-server).
#   scripts/build_llama_cpp.sh <python of the venv> llama-cpp-python==<version>      (`make llama` runs it)
# One cmake build of the llama.cpp that llama-cpp-python's sdist vendors, as shared libraries plus the tools, kept
# under $LABS_CACHE/llama.cpp/<version>-<hash of the flags>: a second clone on the same machine skips the compile.
# The binding is installed without its own compile (its CMake option LLAMA_BUILD=OFF) and its lib/ folder, where
# llama_cpp/llama_cpp.py loads libllama.so from, is a link to the build's bin/ folder: one libllama for both.
set -euo pipefail
PY=${1:?usage: build_llama_cpp.sh <python> llama-cpp-python==<version>}
PIN=${2:?usage: build_llama_cpp.sh <python> llama-cpp-python==<version>}
VERSION=${PIN#llama-cpp-python==}
CACHE=${LABS_CACHE:-$HOME/.cache/spark-quant-labs}
TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench llama-server"

# On x86-64 the build is portable (AVX2): a -march=native build crashed in the AMX matmul on a VM that advertises
# AMX. Elsewhere (DGX Spark's Arm CPU) llama.cpp's native default is used. CUDA only with LLAMA_CPP_CUDA=ON (and nvcc
# and a GPU present): the tools and servers then run on the GPU, but the Python binding linked to that build crashed
# when a GGUF was loaded in a process that had imported torch (Labs 05 and 07; TROUBLESHOOTING.md, 'GGUF').
FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
 -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF \
 -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  FLAGS="$FLAGS -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
if [ "${LLAMA_CPP_CUDA:-OFF}" = ON ] && command -v nvcc >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  FLAGS="$FLAGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native"
fi
HOME_DIR="$CACHE/llama.cpp/$VERSION-$(echo "$FLAGS $TOOLS" | sha1sum | cut -c1-12)"
SRC="$HOME_DIR/llama_cpp_python-$VERSION"

if [ ! -f "$HOME_DIR/built" ]; then
  echo "Building llama.cpp ($VERSION's vendored copy) once: about 8 minutes on 2 cores, into $HOME_DIR"
  mkdir -p "$HOME_DIR"
  [ -d "$SRC" ] || {
    if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
      cp "$LLAMA_CPP_SDIST" "$HOME_DIR/llama_cpp_python-$VERSION.tar.gz"
    else
      "$PY" -m pip download -q --no-binary :all: --no-deps "$PIN" -d "$HOME_DIR"
    fi
    tar xzf "$HOME_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$HOME_DIR"
  }
  GENERATOR=$(command -v ninja >/dev/null && echo "-G Ninja" || true)
  # shellcheck disable=SC2086
  cmake -S "$SRC/vendor/llama.cpp" -B "$HOME_DIR/build" $GENERATOR $FLAGS > "$HOME_DIR/configure.log"
  # shellcheck disable=SC2086
  start=$SECONDS
  cmake --build "$HOME_DIR/build" -j "$(nproc)" --target $TOOLS
  echo "compiled in $((SECONDS - start)) s on $(nproc) cores" | tee "$HOME_DIR/compile-time.txt"
  # the binding's Python code only: its CMake file compiles nothing with LLAMA_BUILD=OFF
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip wheel -q --no-deps "$SRC" -w "$HOME_DIR/wheel"
  touch "$HOME_DIR/built"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$HOME_DIR"/wheel/llama_cpp_python-*.whl
PACKAGE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp"
rm -rf "$PACKAGE/lib"
ln -s "$HOME_DIR/build/bin" "$PACKAGE/lib"
"$PY" -c "import llama_cpp; assert llama_cpp.llama_supports_mmap()"
"$PACKAGE/lib/llama-server" --version 2>&1 | grep -q "^version:"
echo "llama.cpp: the binding and the tools share $HOME_DIR/build/bin"
