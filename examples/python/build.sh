#!/usr/bin/env bash
# Builds the Python KVdb guests into WebAssembly components with componentize-py.
#
#   examples/python/build.sh            # every guest: hello, visitors
#   examples/python/build.sh hello      # one guest
#
# Output: target/python-guests/NAME.wasm (repo root). componentize-py is
# installed, pinned, into a venv under target/python-guests/venv on first use.
# Environment: PYTHON (default python3, needs 3.10+), COMPONENTIZE_PY_VERSION,
# KVDB_WIT (the WIT directory, default wit/ of the repo), OUT_DIR.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="${COMPONENTIZE_PY_VERSION:-0.25.1}"
python="${PYTHON:-python3}"
out="${OUT_DIR:-$root/target/python-guests}"
wit="${KVDB_WIT:-$root/wit}"
venv="$out/venv"
cpy="$venv/bin/componentize-py"

mkdir -p "$out"
if ! "$cpy" --version 2>/dev/null | grep -qx "componentize-py $version"; then
    echo "installing componentize-py==$version into $venv" >&2
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$version"
fi

guests=("$@")
if [ ${#guests[@]} -eq 0 ]; then
    guests=(hello visitors)
fi

for name in "${guests[@]}"; do
    src="$here/$name"
    [ -f "$src/app.py" ] || { echo "no guest $src/app.py" >&2; exit 1; }
    start=$(date +%s%N)
    # The bindings (module `wit_world`) are generated on the fly from the WIT;
    # `componentize-py -d wit -w script bindings DIR` writes stubs for an IDE.
    # VIRTUAL_ENV is cleared so that the venv's own site-packages (componentize-py
    # itself) is not bundled into the component.
    (cd "$src" && env -u VIRTUAL_ENV "$cpy" -q -d "$wit" -w script \
        componentize -p "$src" app -o "$out/$name.wasm")
    end=$(date +%s%N)
    ms=$(((end - start) / 1000000))
    printf '%s: %s bytes in %d.%03ds\n' "$out/$name.wasm" \
        "$(wc -c < "$out/$name.wasm" | tr -d ' ')" $((ms / 1000)) $((ms % 1000)) >&2
done
