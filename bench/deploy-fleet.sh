#!/usr/bin/env bash
# Benchmark: control-plane overhead of a rolling deployment.
#
# A coordinator and AGENTS local agents (one process each, own state and TLS
# dirs) in WAVES zones; a small release with no hooks and no health checks;
# a rolling deployment with no canary, one zone per wave, no minimum-healthy
# floor, no minimum healthy time and no bake, so what remains is the
# coordinator's and the agents' own work. Timed from the command to its end.
# In the same run, the same rolling update with Ansible: AGENTS hosts with
# the local connection (one directory per host), `serial` batches of the
# same size, get_url (sha256 checksum) from the same S3 server, unarchive,
# symlink switch.
#
#   bench/deploy-fleet.sh [AGENTS=100] [WAVES=10]
#
# Needs: python3 (moto and ansible-core are installed from PyPI into
# ${XDG_CACHE_HOME:-~/.cache}/rollwave/bench-venv), curl, unzip (Ansible's
# unarchive uses it), jq, bc. Builds release binaries. About 2 minutes for
# 100 agents, most of it Ansible's. KEEP=1 keeps the work dir (logs,
# journals) for inspection; every process started here is stopped on exit,
# however it exits. IDLE_SAMPLE=SECONDS (default 10) sets how long the idle
# fleet's CPU use is sampled; HEARTBEAT=DURATION passes
# --heartbeat-interval to the coordinator (default: its own, 5s).
#
# What each figure includes is printed with it (bench/deploy-fleet-report.py
# derives them from the agents' logs and journals and the coordinator's log).
set -euo pipefail
cd "$(dirname "$0")/.."
agents="${1:-100}"
waves="${2:-10}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'deploy-fleet: %s\n' "$*" >&2; exit 1; }

[[ $agents =~ ^[0-9]+$ && $waves =~ ^[0-9]+$ ]] || die "usage: bench/deploy-fleet.sh [AGENTS] [WAVES]"
((waves >= 1 && agents >= waves && agents % waves == 0)) ||
    die "AGENTS ($agents) must be a multiple of WAVES ($waves), so every wave has the same size"
((agents <= 1000)) || die "at most 1000 agents"
per_wave=$((agents / waves))
for tool in curl unzip jq bc; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

venv="${ROLLWAVE_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rollwave/bench-venv}"
if ! "$venv/bin/python" -c 'import moto.server, boto3, ansible' 2>/dev/null ||
    [[ ! -x $venv/bin/ansible-playbook ]]; then
    log "installing moto and ansible-core into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5' 'ansible-core>=2.15'
fi
py="$venv/bin/python"

log "building release binaries"
cargo build --release --quiet -p rollwave-agent -p rollwave-coordinator
agent_bin="$PWD/target/release/rollwave-agent"
rollwave_bin="$PWD/target/release/rollwave"
report_py="$PWD/bench/deploy-fleet-report.py"
playbook="$PWD/bench/ansible/rolling-update.yml"

# ---- processes and cleanup ----

work=$(mktemp -d "${TMPDIR:-/tmp}/rollwave-fleet-XXXXXX")
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if ((status != 0)) && [[ -f $work/server.log ]]; then
        log "failed; the coordinator's last log lines (KEEP=1 keeps every log):"
        tail -n 15 "$work/server.log" >&2
    fi
    # In reverse order of start: agents (so they stop reconnecting), the coordinator, S3.
    local index pid
    for ((index = ${#pids[@]} - 1; index >= 0; index--)); do
        kill -TERM "${pids[index]}" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

# wait_until DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND every 0.2 s.
wait_until() {
    local what=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
        sleep 0.2
    done
}

# ---- S3 (moto) ----

s3_port=$(free_port)
"$py" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
pids+=($!)
s3="http://127.0.0.1:$s3_port"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
export NO_COLOR=1
wait_until "the S3 server (moto, log $work/moto.log)" 30 curl -fsS "$s3/moto-api/"
bucket=bench-releases
"$py" - "$s3" "$bucket" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
s3.create_bucket(Bucket=sys.argv[2])
s3.put_bucket_versioning(Bucket=sys.argv[2], VersioningConfiguration={"Status": "Enabled"})
EOF

# ---- coordinator ----

server_dir="$work/server"
server_port=$(free_port)
log "starting the coordinator on 127.0.0.1:$server_port"
"$rollwave_bin" server --data-dir "$server_dir" --listen "127.0.0.1:$server_port" \
    ${HEARTBEAT:+--heartbeat-interval "$HEARTBEAT"} >"$work/server.log" 2>&1 &
pids+=($!)
rw() { timeout 120 "$rollwave_bin" --config "$server_dir/cli.toml" "$@"; }
wait_until "the coordinator (log $work/server.log)" 60 rw stack list
rw stack create bench >/dev/null
join_token=$(rw token create --stack bench --uses "$agents" --ttl 1h)

# ---- agents ----

log "starting $agents agents in $waves zones"
zone_of() { printf 'z%02d' $(($1 / per_wave + 1)); }
for i in $(seq 0 $((agents - 1))); do
    name=$(printf 'a%03d' $((i + 1)))
    dir="$work/agents/$name"
    mkdir -p "$dir"
    cat >"$dir/agent.toml" <<EOF
coordinator = "127.0.0.1:$server_port"
join_token = "$join_token"
stack = "bench"
layer = "app"
zone = "$(zone_of "$i")"
instance_id = "$name"
hostname = "$name"
imds = "off"
state_dir = "$dir/state"
tls_dir = "$dir/tls"

[s3]
endpoint = "$s3"
region = "us-east-1"
force_path_style = true

[install]
health_deadline = "30s"
EOF
    "$agent_bin" run --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
    pids+=($!)
done
online() {
    local count
    count=$(rw instance list --stack bench --output json | jq '[.[] | select(.presence == "online")] | length')
    ((count == agents))
}
wait_until "$agents agents online" $((60 + agents)) online
log "$agents agents online"

# ---- the release, v1 everywhere ----

tree="$work/tree"
mkdir -p "$tree/bin" "$tree/static"
for version in 1.0 2.0; do
    printf '#!/bin/sh\necho "app %s"\n' "$version" >"$tree/bin/app"
    chmod +x "$tree/bin/app"
    printf '<h1>app %s</h1>\n' "$version" >"$tree/static/index.html"
    head -c 65536 /dev/zero | tr '\0' 'x' >"$tree/static/asset.css"
    printf 'version = "%s"\n' "$version" >"$tree/VERSION"
    # No hooks, no health checks: the deployment measures the control plane.
    printf '# bench release %s: no hooks, no health checks\n' "$version" >"$tree/rollwave.toml"
    rw release build "$tree" --out "$work/app-$version.zip" >/dev/null
    rw release push "$work/app-$version.zip" --bundle app --version "$version" \
        --bucket "$bucket" --s3-endpoint "$s3" --s3-path-style >/dev/null
done
log "pushed app 1.0 and 2.0 ($(stat -c %s "$work/app-2.0.zip") bytes)"

log "deploying app@1.0 to every agent (all at once, untimed)"
timeout 600 "$rollwave_bin" --config "$server_dir/cli.toml" deploy bench app@1.0 \
    --strategy all-at-once --min-healthy-time 0s --watch >"$work/deploy-1.log" 2>&1 ||
    { cat "$work/deploy-1.log" >&2; die "the v1 deployment failed"; }

# ---- the idle fleet's cost: CPU and memory of the coordinator and the agents ----

idle_seconds=${IDLE_SAMPLE:-10}
log "sampling the idle fleet for ${idle_seconds}s (CPU, RSS)"
"$py" - "$idle_seconds" "${pids[1]}" "${pids[@]:2}" >"$work/idle.txt" <<'EOF'
import os, sys, time
seconds, server, agents = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick
def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
before = (cpu(server), sum(cpu(pid) for pid in agents))
time.sleep(seconds)
after = (cpu(server), sum(cpu(pid) for pid in agents))
rss = sorted(rss_mib(pid) for pid in agents)
print(f"Idle fleet over {seconds:.0f} s (heartbeats, health reports every 2 s):")
print(f"  coordinator: {100 * (after[0] - before[0]) / seconds:5.1f} % of a core, RSS {rss_mib(server):.0f} MiB")
print(
    f"  {len(agents)} agents: {100 * (after[1] - before[1]) / seconds:5.1f} % of a core in all, "
    f"RSS {sum(rss):.0f} MiB in all (median {rss[len(rss) // 2]:.1f} MiB)"
)
EOF

# ---- the timed rolling deployment ----

deploy_flags=(--canary 0 --batch 100% --min-healthy 0 --min-healthy-time 0s --bake 0s)
rw deploy bench app@2.0 "${deploy_flags[@]}" --plan --output json >"$work/plan.json"
planned=$(jq -r '.waves | map(.instances | length | tostring) | join(" ")' "$work/plan.json")
expected=$(printf "$per_wave %.0s" $(seq 1 "$waves"))
[[ "$planned " == "$expected" ]] ||
    die "the plan is not $waves waves of $per_wave: wave sizes $planned (plan in $work/plan.json)"

log "TIMED: rolling deployment of app@2.0: $waves waves of $per_wave"
rollwave_start=$(now)
timeout 900 "$rollwave_bin" --config "$server_dir/cli.toml" deploy bench app@2.0 "${deploy_flags[@]}" \
    --watch --output json >"$work/deploy-2.json" 2>"$work/deploy-2.log" ||
    { cat "$work/deploy-2.log" >&2; die "the v2 deployment failed"; }
rollwave_end=$(now)
rollwave_seconds=$(echo "$rollwave_end - $rollwave_start" | bc)
deployment_id=$(jq -r '.id' "$work/deploy-2.json")
rw deployment show "$deployment_id" --output json >"$work/deployment.json"
log "rollwave: $rollwave_seconds s"

# ---- the Ansible rolling update ----

ansible_dir="$work/ansible"
mkdir -p "$ansible_dir/home" "$ansible_dir/tmp"
read -r sha256 _ < <(sha256sum "$work/app-2.0.zip")
{
    echo "[fleet]"
    for i in $(seq 1 "$agents"); do
        name=$(printf 'h%03d' "$i")
        host_dir="$ansible_dir/hosts/$name"
        # Like the agents: v1 unpacked and current, untimed.
        mkdir -p "$host_dir/downloads" "$host_dir/releases/1.0"
        unzip -q "$work/app-1.0.zip" -d "$host_dir/releases/1.0"
        ln -s releases/1.0 "$host_dir/current"
        echo "$name ansible_connection=local host_dir=$host_dir"
    done
} >"$ansible_dir/inventory.ini"
"$py" - "$s3" "$bucket" "$per_wave" "$sha256" >"$ansible_dir/vars.json" <<'EOF'
import json, sys, boto3
endpoint, bucket, batch, sha256 = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint)
version = s3.head_object(Bucket=bucket, Key="releases/app/2.0.zip")["VersionId"]
url = s3.generate_presigned_url(
    "get_object", Params={"Bucket": bucket, "Key": "releases/app/2.0.zip", "VersionId": version}, ExpiresIn=3600
)
json.dump({"batch": int(batch), "release_url": url, "release_sha256": sha256, "release_version": "2.0"}, sys.stdout)
EOF
cat >"$ansible_dir/ansible.cfg" <<EOF
[defaults]
forks = $per_wave
gathering = explicit
host_key_checking = False
retry_files_enabled = False
interpreter_python = $py
local_tmp = $ansible_dir/tmp
remote_tmp = $ansible_dir/tmp
EOF
run_ansible() {
    ANSIBLE_CONFIG="$ansible_dir/ansible.cfg" ANSIBLE_HOME="$ansible_dir/home" LC_ALL=C.UTF-8 \
        timeout 1800 "$venv/bin/ansible-playbook" -i "$ansible_dir/inventory.ini" \
        -e "@$ansible_dir/vars.json" "$playbook"
}

log "TIMED: Ansible rolling update to 2.0: serial $per_wave, forks $per_wave"
ansible_start=$(now)
run_ansible >"$ansible_dir/run.log" 2>&1 || { tail -40 "$ansible_dir/run.log" >&2; die "the Ansible run failed"; }
ansible_end=$(now)
ansible_seconds=$(echo "$ansible_end - $ansible_start" | bc)
log "ansible: $ansible_seconds s"
for i in $(seq 1 "$agents"); do
    host_dir="$ansible_dir/hosts/$(printf 'h%03d' "$i")"
    [[ $(readlink "$host_dir/current") == releases/2.0 && -x $host_dir/current/bin/app ]] ||
        die "Ansible did not switch $host_dir to 2.0"
done

# ---- summary ----

echo
echo "Rollwave: rollwave deploy bench app@2.0 ${deploy_flags[*]} --watch"
echo "Ansible:  ansible-playbook bench/ansible/rolling-update.yml (serial $per_wave, forks $per_wave, local connection)"
"$py" "$report_py" --work "$work" --agents "$agents" --waves "$waves" \
    --release-bytes "$(stat -c %s "$work/app-2.0.zip")" \
    --rollwave-start "$rollwave_start" --rollwave-end "$rollwave_end" \
    --ansible-start "$ansible_start" --ansible-end "$ansible_end"
echo
cat "$work/idle.txt"
