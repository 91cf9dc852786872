#!/usr/bin/env bash
# Benchmark: install a 256 MiB release (a few large and thousands of small
# files) from a local S3 server, against in the same run
#   - the pipeline a user would script: download (AWS CLI if present, and
#     curl), sha256sum, unzip, sync;
#   - the local floor: sha256sum + unzip of a local copy, then sync.
# Also reports the agent's peak RSS (GNU time) while installing.
#
#   bench/install-release.sh [RUNS]      # default 3 runs of each, median reported
#
# Needs: python3 (for the moto S3 server, installed into the test venv),
# curl, unzip, sha256sum, /usr/bin/time. Builds release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"

log() { printf '==> %s\n' "$*" >&2; }

venv="${ROLLWAVE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rollwave/test-venv}"
if ! "$venv/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
    log "installing moto into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5'
fi

log "building release binaries"
cargo build --release --quiet -p rollwave-agent -p rollwave-coordinator
agent="$PWD/target/release/rollwave-agent"
rollwave="$PWD/target/release/rollwave"

work=$(mktemp -d "${TMPDIR:-/tmp}/rollwave-bench-XXXXXX")
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/python" -m moto.server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; rm -rf "$work"' EXIT
endpoint="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
for _ in $(seq 1 100); do
    curl -fsS "$endpoint/moto-api/" >/dev/null 2>&1 && break
    sleep 0.1
done

log "generating the release tree: 3 x 64 MiB + 4000 x 16 KiB"
tree="$work/tree"
mkdir -p "$tree/bin" "$tree/assets"
"$venv/bin/python" - "$tree" <<'EOF'
import os, sys
tree = sys.argv[1]
# Half random, half repetitive: compresses about 2:1, like real binaries.
for i in range(1, 4):
    with open(f"{tree}/bin/large-{i}", "wb") as out:
        out.write(os.urandom(32 << 20))
        out.write((f"rollwave large file {i}\n".encode() * (2 << 20))[: 32 << 20])
root = f"{tree}/assets"
for d in range(40):
    os.makedirs(f"{root}/{d:02}", exist_ok=True)
    for f in range(100):
        body = (os.urandom(4096).hex()[:8192] + f"asset {d} {f}\n" * 500)[:16384]
        with open(f"{root}/{d:02}/asset-{f:03}.txt", "w") as out:
            out.write(body)
EOF
"$rollwave" release build "$tree" --out "$work/release.zip" --output json >"$work/build.json"
sha=$(sha256sum "$work/release.zip" | cut -d' ' -f1)
size=$(stat -c %s "$work/release.zip")
unpacked=$(du -sb "$tree" | cut -f1)
log "archive: $((size >> 20)) MiB, unpacked $((unpacked >> 20)) MiB, sha256 $sha"

log "uploading to a versioned bucket"
version_id=$("$venv/bin/python" - "$endpoint" "$work/release.zip" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
s3.create_bucket(Bucket="bench")
s3.put_bucket_versioning(Bucket="bench", VersioningConfiguration={"Status": "Enabled"})
with open(sys.argv[2], "rb") as body:
    version = s3.put_object(Bucket="bench", Key="releases/app/1.zip", Body=body)["VersionId"]
url = s3.generate_presigned_url(
    "get_object", Params={"Bucket": "bench", "Key": "releases/app/1.zip", "VersionId": version}, ExpiresIn=3600
)
print(version, url)
EOF
)
read -r version_id presigned_url <<<"$version_id"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A results

measure() {
    local name=$1
    shift
    local times=()
    for run in $(seq 1 "$runs"); do
        rm -rf "$work/out" && mkdir -p "$work/out"
        sync
        local start end
        start=$(now)
        "$@"
        end=$(now)
        times+=("$(echo "$end - $start" | bc)")
    done
    results[$name]=$(printf '%s\n' "${times[@]}" | median)
    printf '%-34s %s s (runs: %s)\n' "$name" "${results[$name]}" "${times[*]}" >&2
}

rollwave_install() {
    RUST_LOG=warn /usr/bin/time -f '%M' -o "$work/rss" "$agent" install --root "$work/out" --bundle app --version 1 \
        --sha256 "$sha" --s3-url s3://bench/releases/app/1.zip --s3-version-id "$version_id" --size "$size" \
        --s3-endpoint "$endpoint" --s3-path-style --no-hooks >/dev/null
    cat "$work/rss" >>"$work/rss.all"
}

curl_pipeline() {
    curl -fsS -o "$work/out/release.zip" "$presigned_url"
    echo "$sha  $work/out/release.zip" | sha256sum -c --quiet -
    unzip -q "$work/out/release.zip" -d "$work/out/app"
    sync
}

aws_pipeline() {
    aws --endpoint-url "$endpoint" s3api get-object --bucket bench --key releases/app/1.zip \
        --version-id "$version_id" "$work/out/release.zip" >/dev/null
    echo "$sha  $work/out/release.zip" | sha256sum -c --quiet -
    unzip -q "$work/out/release.zip" -d "$work/out/app"
    sync
}

local_floor() {
    echo "$sha  $work/release.zip" | sha256sum -c --quiet -
    unzip -q "$work/release.zip" -d "$work/out/app"
    sync
}

measure "local floor (sha256sum+unzip+sync)" local_floor
measure "rollwave-agent install (S3)" rollwave_install
measure "curl+sha256sum+unzip+sync" curl_pipeline
if command -v aws >/dev/null 2>&1 && aws --version >/dev/null 2>&1; then
    measure "aws s3api+sha256sum+unzip+sync" aws_pipeline
fi

floor=${results["local floor (sha256sum+unzip+sync)"]}
ours=${results["rollwave-agent install (S3)"]}
peak=$(sort -n "$work/rss.all" | tail -1)
echo
echo "release: $((size >> 20)) MiB zip, $((unpacked >> 20)) MiB unpacked, $(jq -r .entries "$work/build.json" 2>/dev/null || echo '?') entries"
for name in "${!results[@]}"; do
    printf '%-34s %6.2f s  %5.2fx floor\n' "$name" "${results[$name]}" "$(echo "${results[$name]} / $floor" | bc -l)"
done | sort
echo "rollwave-agent peak RSS: $((peak / 1024)) MiB ($peak KiB)"
echo "ratio to floor: $(echo "$ours / $floor" | bc -l | cut -c1-5)"
